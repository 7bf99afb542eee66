"""``edit.memit``: MEMIT mass editing spread over several MLP down-projections.

Meng et al., "Mass-Editing Memory in a Transformer" (arXiv 2210.07229; ``kmeng01/memit`` ``memit_main.py``):

1. z_i = h_L(i) + δ_i: δ added to the output of the *last* edited layer L at the subject's last token and
   optimised as for EMMET (clamp and weight decay relative to ‖h_L‖).
2. For the edited layers l₁ < … < L in order: K_l = averaged keys with the current weights, R = Z − H_L(current
   weights, plain prompts), R_l = R / (layers left, this one included), ΔW_l = R_l K_lᵀ(λC_l + K_lK_lᵀ)⁻¹,
   applied before the next layer's keys are taken. Each batch is one block-by-block pass of the model engine
   (:mod:`.spread`); v* runs on the engine too (:mod:`.engine_values`), so nothing builds the whole model.

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

from .editing import (
    EditParams,
    covariance,
    edit_requests,
    measure_after,
    measure_before,
    prefixes_for,
    settings_for,
    style,
    warn_duplicates,
    write_back,
)
from .requests import Request, subject_batches
from .site import EditSite, locate
from .solve import ridge_factors
from .spread import SpreadResult, spread

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


def edited_layers(params: Params, roles) -> tuple[list[int], str]:
    """``--layers`` (checked against the model's depth) or the family's default layers, and the rule used."""
    if not params.layers:
        return default_layers(roles.family, roles.n_layers)
    layers = sorted(set(params.layers))
    bad = [x for x in layers if not 0 <= x < roles.n_layers]
    if bad:
        raise SurgeonError(f"--layers {bad[0]}: the model has layers 0..{roles.n_layers - 1}")
    return layers, "--layers"


def z_facts(requests: list[Request], vals, res: SpreadResult, **extra) -> list[dict[str, Any]]:
    """Per request: the value optimisation's outcome and how far the top layer's output got towards z
    (‖H_L − z‖ / ‖z − H_L(before)‖ after the spread)."""
    zs = res.start + (vals.values - vals.initial)
    miss = ((res.reached - zs).norm(dim=0) / (zs - res.start).norm(dim=0).clamp_min(1e-12)).tolist()
    return [{"subject": r.subject, "target": r.target, **extra, "value_loss": round(vals.losses[j], 4),
             "value_target_prob": round(vals.target_prob[j], 4), "value_steps": vals.steps[j],
             "z_rel_error": float(f"{miss[j]:.3g}")} for j, r in enumerate(requests)]


def spread_batch(work, ctx, tok, sites: list[EditSite], batch: list[Request], prefixes: list[str], settings,
                 solve, spill, timings: dict[str, float]):
    """One batch on the engine: v* at the last site (:mod:`.engine_values`, on ``work``: earlier batches' updates
    included), then the spread over ``sites`` (:func:`.spread.spread`); ``work`` gets the changed weights (lazy
    fp32 nodes). Returns (the values, the spread)."""
    from .engine_values import optimise_values_engine

    t = time.perf_counter()
    vals = optimise_values_engine(work, ctx, sites[-1], tok, batch, prefixes, settings, status=ctx.status)
    timings["keys_values_s"] = timings.get("keys_values_s", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    res = spread(work, ctx, tok, sites, batch, prefixes, vals.values - vals.initial, solve, spill=spill,
                 uniform_keys=settings.uniform_keys)
    for name, node in res.weights.items():
        work.replace(name, node)
    timings["spread_s"] = timings.get("spread_s", 0.0) + time.perf_counter() - t
    return vals, res


def _memit_batches(graph, tok, sites, factors, batches, prefixes, settings, lam: float, ctx,
                   timings: dict[str, float]):
    """z at the last layer's output for each batch (values), then the update spread over the layers; returns
    (per layer the (up, down) of each batch, per-edit facts, the working graph with every update in fp32)."""
    from surgeon.engine import SpillStore

    work, spill = graph.copy(), SpillStore(getattr(ctx, "work_dir", None))
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in sites]
    per_edit: list[dict[str, Any]] = []
    timings.update(keys_values_s=0.0, spread_s=0.0)
    for batch in ctx.progress(batches, description="memit batches"):
        vals, res = spread_batch(work, ctx, tok, sites, batch, prefixes, settings,
                                 lambda i, r, k: ridge_factors(r, k, factors[i], lam), spill, timings)
        per_edit.extend(z_facts(batch, vals, res))
        for acc, part in zip(per_layer, res.parts):
            acc.append(part)
    return per_layer, per_edit, work


def multilayer_setup(graph, params, ctx, op: str):
    """What MEMIT and AlphaEdit do before editing: the requests (duplicates warned about), the edited layers and
    their sites, a copy of ``graph`` to edit, the tokenizer."""
    requests = edit_requests(params, ctx)
    warn_duplicates(requests, ctx)
    if params.layer is not None:
        raise SurgeonError(f"{op}: use --layers (a list) instead of --layer")
    roles = ctx.roles(graph)
    layers, rule = edited_layers(params, roles)
    sites = [locate(graph, x, roles) for x in layers]
    return graph.copy(), requests, layers, rule, sites, {}, ctx.tokenizer(graph)


@register("edit.memit", Params, model_level=True,
          summary="MEMIT mass edits spread over several MLP layers (Meng et al. 2023).")
def apply(graph, params: Params, ctx):
    """Rewrite all requests' facts, one batch at a time, spreading each batch's update over the layers."""
    graph, requests, layers, rule, sites, timings, tok = multilayer_setup(graph, params, ctx, "edit.memit")
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

    base = measure_before(graph, tok, requests, params, ctx, timings)

    t0 = time.perf_counter()
    prefixes = prefixes_for("memit", graph, tok, params, ctx)
    timings["prefixes_s"] = time.perf_counter() - t0
    batches = subject_batches(requests, params.batch_size)
    per_layer, per_edit, work = _memit_batches(graph, tok, sites, factors, batches, prefixes, settings, lam, ctx,
                                               timings)
    write_back(graph, [(s, [u for u, _ in acc], [d for _, d in acc]) for s, acc in zip(sites, per_layer)], ctx,
               requests, op="edit.memit")
    result: dict[str, Any] = {"kind": "edit.memit", "title": "Knowledge edit (MEMIT)", "requests": len(requests),
                              "layers": layers}
    measure_after(work, tok, requests, base, result, ctx, timings)
    graph.results.append(result)
    notes = [(f"MEMIT edit of {len(requests)} fact(s) spread over layers {layers} "
              f"({', '.join(s.name for s in sites)}); factors and the original tensors are in `edits.safetensors`.")]
    ctx.report(method="memit", tensors=[s.name for s in sites], layers=layers, layer_rule=rule,
               family=sites[-1].family, lam=lam, batches=len(batches), n_prefixes=len(prefixes),
               style=style("memit", params), value_settings=vars(settings), **stats_info, edits=per_edit,
               metrics=result, timings_s={k: round(v, 3) for k, v in timings.items()}, card_notes=notes)
    graph.tags = sorted(set(graph.tags) | {"knowledge-editing", "memit"})
    return graph
