"""``edit.memit``: MEMIT mass editing spread over several MLP down-projections.

Meng et al., "Mass-Editing Memory in a Transformer" (arXiv 2210.07229; ``kmeng01/memit`` ``memit_main.py``):

1. z_i = h_L(i) + δ_i: δ added to the output of the *last* edited layer L at the subject's last token and
   optimised as for EMMET (clamp and weight decay relative to ‖h_L‖).
2. For the edited layers l₁ < … < L in order: K_l = averaged keys with the current weights, R = Z − H_L(current
   weights, plain prompts), R_l = R / (layers left, this one included), ΔW_l = R_l K_lᵀ(λC_l + K_lK_lᵀ)⁻¹,
   applied before the next layer's keys are taken.

λ is ``mom2_update_weight`` on C = E[kkᵀ] per token (default 20000 GPT-2, 15000 GPT-J and Llama). With one layer
this is EMMET with λ′ = λ (:mod:`.emmet`); the factored solve of :func:`.solve.ridge_factors` is shared.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from surgeon.errors import SurgeonError
from surgeon.registry import register

from . import keys_values as kv
from .editing import (
    EditParams,
    add_in_place,
    covariance,
    edit_requests,
    materialise,
    measure_after,
    measure_before,
    prefixes_for,
    settings_for,
    style,
    warn_duplicates,
    write_back,
)
from .forward import decoder_layer
from .requests import Request, subject_batches
from .site import EditSite, locate
from .solve import ridge_factors

#: family -> (reference depth, first, last edited layer): GPT-2 XL 13–17 of 48 and GPT-J 3–8 of 28
#: (kmeng01/memit hparams/MEMIT), Llama-2-7B 4–8 of 32 (EasyEdit hparams/MEMIT/llama-7b.yaml)
REFERENCE_LAYERS: dict[str, tuple[int, int, int]] = {"gpt2": (48, 13, 17), "gptj": (28, 3, 8), "llama": (32, 4, 8)}


def default_layers(family: str, n_layers: int) -> tuple[list[int], str]:
    """(edited layers, rule): the reference range for the family, both ends scaled to this depth with
    ``round(n_layers · l / n_ref)``; families without a published range use the Llama one and say so."""
    ref = REFERENCE_LAYERS.get(family)
    n_ref, first, last = ref if ref is not None else REFERENCE_LAYERS["llama"]
    lo, hi = (min(max(round(n_layers * x / n_ref), 0), n_layers - 1) for x in (first, last))
    src = family if ref is not None else f"llama (no published MEMIT layers for {family})"
    return list(range(lo, hi + 1)), f"{first}..{last} of {n_ref} scaled to {n_layers} layers from {src}"


class Params(EditParams):
    """MEMIT knobs: those of :class:`EditParams` plus the edited layers, λ and the batch size."""

    layers: list[int] | None = Field(None, description="Layers whose MLP down-projections share each edit "
                                                       "(default: the family's reference range, scaled).")
    lam: float | None = Field(None, ge=0, description="λ (mom2_update_weight) on C per token: ΔW_l = R_lK_lᵀ"
                                                      "(λC_l + K_lK_lᵀ)⁻¹. Default 15000 (GPT-2: 20000).")
    batch_size: int = Field(1024, ge=1, le=1024, description="Unique subjects per batch (≤ 1024); more are "
                                                             "applied in sequential batches.")


def spread(model: torch.nn.Module, tok: Any, sites: list[EditSite], modules: list[torch.nn.Module],
           factors: list[Any], requests: list[Request], prefixes: list[str], zs: torch.Tensor, lam: float, *,
           device: str, uniform_keys: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MEMIT's insertion loop: ``(up, down)`` per layer, each applied to its module in place before the next
    layer's keys and the top layer's output are read. ``zs`` [d_model, n] are the targets of the last layer's
    output; ``factors`` the Cholesky factors of each layer's C."""
    top = decoder_layer(model, modules[-1])
    out = []
    for i, (site, module, factor) in enumerate(zip(sites, modules, factors)):
        keys = kv.compute_keys(model, tok, module, requests, prefixes, device=device, uniform=uniform_keys)
        current = kv.layer_outputs(model, tok, top, requests, device=device)
        residual = (zs - current) / (len(sites) - i)  # distribute what is left over the layers left
        up, down = ridge_factors(residual, keys, factor, lam)
        add_in_place(module, site, up, down)
        out.append((up, down))
    return out


def edited_layers(params: Params, roles) -> tuple[list[int], str]:
    """``--layers`` (checked against the model's depth) or the family's default layers, and the rule used."""
    if not params.layers:
        return default_layers(roles.family, roles.n_layers)
    layers = sorted(set(params.layers))
    bad = [x for x in layers if not 0 <= x < roles.n_layers]
    if bad:
        raise SurgeonError(f"--layers {bad[0]}: the model has layers 0..{roles.n_layers - 1}")
    return layers, "--layers"


def _memit_batches(model, tok, sites, modules, factors, batches, prefixes, settings, lam: float, ctx,
                   timings: dict[str, float]):
    """z at the last layer's output for each batch (values), then the update spread over the layers; returns
    (per layer the (up, down) of each batch, per-edit facts)."""
    top = decoder_layer(model, modules[-1])
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in sites]
    per_edit: list[dict[str, Any]] = []
    t_values = t_solve = 0.0
    for batch in ctx.progress(batches, description="memit batches"):
        t = time.perf_counter()
        vals = kv.optimise_values_chunked(model, tok, modules[-1], batch, prefixes, settings, device=ctx.device,
                                          status=ctx.status)
        h0 = kv.layer_outputs(model, tok, top, batch, device=ctx.device)
        zs = h0 + (vals.values - vals.initial)  # target_init + δ at the last layer's output
        t_values += time.perf_counter() - t
        t = time.perf_counter()
        parts = spread(model, tok, sites, modules, factors, batch, prefixes, zs, lam, device=ctx.device,
                       uniform_keys=settings.uniform_keys)
        t_solve += time.perf_counter() - t
        reached = kv.layer_outputs(model, tok, top, batch, device=ctx.device)
        miss = ((reached - zs).norm(dim=0) / (zs - h0).norm(dim=0).clamp_min(1e-12)).tolist()
        for j, r in enumerate(batch):
            per_edit.append({"subject": r.subject, "target": r.target, "value_loss": round(vals.losses[j], 4),
                             "value_target_prob": round(vals.target_prob[j], 4), "value_steps": vals.steps[j],
                             "z_rel_error": float(f"{miss[j]:.3g}")})
        for acc, part in zip(per_layer, parts):
            acc.append(part)
    timings.update(keys_values_s=t_values, spread_s=t_solve)
    return per_layer, per_edit


def multilayer_setup(graph, params, ctx, op: str):
    """What MEMIT and AlphaEdit do before editing: the requests (duplicates warned about), the edited layers and
    their sites, a copy of ``graph`` to edit, and the materialised model ``(model, tok, modules)``."""
    requests = edit_requests(params, ctx)
    warn_duplicates(requests, ctx)
    if params.layer is not None:
        raise SurgeonError(f"{op}: use --layers (a list) instead of --layer")
    roles = ctx.roles(graph)
    layers, rule = edited_layers(params, roles)
    sites = [locate(graph, x, roles) for x in layers]
    graph = graph.copy()
    timings: dict[str, float] = {}
    return graph, requests, layers, rule, sites, timings, materialise(graph, sites, ctx, timings)


@register("edit.memit", Params, model_level=True,
          summary="MEMIT mass edits spread over several MLP layers (Meng et al. 2023).")
def apply(graph, params: Params, ctx):
    """Rewrite all requests' facts, one batch at a time, spreading each batch's update over the layers."""
    graph, requests, layers, rule, sites, timings, (model, tok, modules) = multilayer_setup(graph, params, ctx,
                                                                                       "edit.memit")
    settings, default_lam = settings_for("memit", sites[-1].family, params, sites[-1].n_layers)
    lam = default_lam if params.lam is None else params.lam
    ctx.log(f"memit: {len(requests)} request(s) into layers {layers} ({rule}), λ {lam:g}")

    t0 = time.perf_counter()
    factors, stats_info = [], {}
    for s in sites:  # every C from the unedited model (the reference reads precomputed stats)
        f, info = covariance(graph, ctx, s, params)
        factors.append(f)
        stats_info = info  # the last layer's facts (all layers share data and token count)
    timings["stats_s"] = time.perf_counter() - t0

    base = measure_before(model, tok, requests, params, graph, ctx, timings)

    t0 = time.perf_counter()
    prefixes = prefixes_for("memit", model, tok, params, ctx)
    timings["prefixes_s"] = time.perf_counter() - t0
    batches = subject_batches(requests, params.batch_size)
    per_layer, per_edit = _memit_batches(model, tok, sites, modules, factors, batches, prefixes, settings, lam, ctx,
                                         timings)
    write_back(graph, [(s, [u for u, _ in acc], [d for _, d in acc]) for s, acc in zip(sites, per_layer)], ctx,
               requests, op="edit.memit")
    result: dict[str, Any] = {"kind": "edit.memit", "title": "Knowledge edit (MEMIT)", "requests": len(requests),
                              "layers": layers}
    measure_after(model, tok, requests, base, result, ctx, timings)
    graph.results.append(result)
    notes = [(f"MEMIT edit of {len(requests)} fact(s) spread over layers {layers} "
              f"({', '.join(s.name for s in sites)}); factors and the original tensors are in `edits.safetensors`.")]
    ctx.report(method="memit", tensors=[s.name for s in sites], layers=layers, layer_rule=rule,
               family=sites[-1].family, lam=lam, batches=len(batches), n_prefixes=len(prefixes),
               style=style("memit", params), value_settings=vars(settings), **stats_info, edits=per_edit,
               metrics=result, timings_s={k: round(v, 3) for k, v in timings.items()}, card_notes=notes)
    graph.tags = sorted(set(graph.tags) | {"knowledge-editing", "memit"})
    return graph
