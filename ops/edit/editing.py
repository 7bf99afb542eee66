"""The flow shared by ``edit.rome`` and ``edit.emmet`` (``edit.memit`` reuses its parts): locate, statistics,
keys, values, closed form, write the low-rank update back into the graph, measure.

Statistics, keys and values run on the model engine (block by block, :mod:`.stats`, :mod:`.engine_values`):
after each request (ROME) or batch (EMMET) the next one runs on a working graph whose edited tensor holds the
earlier updates in fp32, so sequential edits see the earlier ones. The metrics, the sampled prefixes and the
perplexity run on the engine too (:mod:`.metrics`: logits at a few positions, one pass per generated token), so
no step builds the whole model. The graph gets one :class:`~surgeon.graph.LowRank` node whose factors are the
concatenation of every update (earlier low-rank edits of the same tensor are folded in), cast once to the
checkpoint dtype when written. ``edits.safetensors`` in the output holds the factors and the original tensor
(exact undo: ``original`` is the tensor before the first edit).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import keys_values as kv
from . import metrics as mx
from . import prefixes as pf
from .requests import Request, duplicate_subjects, resolve_requests, subject_batches, with_leading_space
from .site import EditSite, locate
from .solve import emmet_update, rome_update

Method = Literal["rome", "emmet", "memit"]

#: §4.5 defaults from the reference hparams: method -> family -> (steps, weight decay, clamp, λ′); "*" for every
#: other family (the Llama-2 values). ROME: kmeng01/rome hparams/ROME (GPT-2 XL/large, GPT-J, NeoX-20B);
#: EMMET: unified-model-editing hparams/EMMET (λ′ = mom2_update_weight · emmet_lambda); MEMIT: kmeng01/memit
#: hparams/MEMIT (GPT-2 XL, GPT-J) and EasyEdit's llama-7b (λ = mom2_update_weight).
DEFAULTS: dict[str, dict[str, tuple[int, float, float, float]]] = {
    "rome": {"gpt2": (20, 0.5, 4.0, 0.0), "gptj": (20, 0.5, 4.0, 0.0), "gpt_neox": (20, 0.5, 4.0, 0.0),
             "*": (25, 1e-3, 4.0, 0.0)},
    "emmet": {"gpt2": (20, 0.5, 0.75, 100.0), "gptj": (25, 0.5, 0.75, 0.1), "*": (25, 1e-3, 4.0, 0.1)},
    "memit": {"gpt2": (20, 0.5, 0.75, 20000.0), "gptj": (25, 0.5, 0.75, 15000.0), "*": (25, 1e-3, 4.0, 15000.0)},
}
#: defaults that the reference ships for one size of a family: (method, family, n_layers) -> as above
EXACT_DEFAULTS: dict[tuple[str, str, int], tuple[int, float, float, float]] = {
    ("rome", "gpt2", 24): (20, 0.5, 3.0, 0.0),  # GPT-2 medium: clamp 3 (hparams/ROME/gpt2-medium.json)
}
N_PREFIXES = {"rome": 20, "emmet": 5, "memit": 5}
#: how each method's reference computes keys and values: clamp/decay reference norm, prefix seeds, key average
STYLE: dict[str, dict[str, str]] = {
    "rome": {"norm_reference": "mlp", "prefix_seeds": "bos", "key_average": "uniform"},
    "emmet": {"norm_reference": "layer", "prefix_seeds": "words", "key_average": "types"},
    "memit": {"norm_reference": "layer", "prefix_seeds": "words", "key_average": "types"},
}
SEQUENTIAL_WARNING = 50  # degradation is reported past a few dozen sequential edits (§4.7)


class EditParams(BaseModel):
    """Knobs shared by ROME and EMMET (``None`` = the reference default for the model's family)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[Request] | str = Field(
        description="Edit requests: a .jsonl/.json/.yaml file, or (in a recipe) an inline list of "
                    "{prompt, subject, target[, target_true, paraphrases, neighborhood]}.")
    layer: int | None = Field(None, ge=0, description="Layer whose MLP down-projection is edited "
                                                      "(default: per family, scaled to the model's depth).")
    stats_data: str = Field("model", description="Text for the key covariance C: a .txt/.jsonl file or folder, "
                                                 "'model[:N]' (text sampled from the model), a ROME .npz "
                                                 "cache, or 'identity' (C = I, same as --no-cov).")
    stats_tokens: int | None = Field(None, gt=0, description="Tokens for C (default 10·d_k from a text file; "
                                     "2·d_k when sampled from the model, FastMEMIT's lower end, because "
                                     "sampling costs one decoding step per token).")
    stats_seqlen: int = Field(256, ge=8, le=4096, description="Window length (tokens) for the statistics pass.")
    cov: bool = Field(True, description="Use the key covariance C (--no-cov: C = I, weaker locality).")
    stats_cache: bool = Field(True, description="Read/write covariance statistics in ~/.cache/surgeon/stats.")
    steps: int | None = Field(None, ge=1, le=1000, description="Adam steps for the value (default 25; GPT-2 20).")
    lr: float = Field(0.5, gt=0, description="Adam learning rate for the value.")
    weight_decay: float | None = Field(None, ge=0, description="Weight on ‖δ‖/‖v₀‖² (ROME) or ‖δ‖/‖h_L‖² "
                                                                "(EMMET/MEMIT) (default 1e-3; GPT-2/J/NeoX 0.5).")
    clamp: float | None = Field(None, gt=0, description="Keep ‖δ‖ ≤ clamp·‖v₀‖ (ROME) or clamp·‖h_L‖ (EMMET/MEMIT) "
                                                         "(default 4; GPT-2 medium ROME 3; EMMET/MEMIT GPT-2/J 0.75).")
    kl_factor: float = Field(0.0625, ge=0, description="Weight of the KL term on '{subject} is a'.")
    n_prefixes: int | None = Field(None, ge=0, le=64, description="Model-sampled prefixes averaged into keys and "
                                                                  "values (default ROME 20, EMMET 5).")
    norm_reference: Literal["mlp", "layer"] | None = Field(
        None, description="What clamp and weight decay are relative to: the MLP output v₀ ('mlp', ROME's code) or "
                          "the layer output h_L ('layer', the MEMIT/EMMET code). Default: the method's reference.")
    prefix_seeds: Literal["bos", "words"] | None = Field(
        None, description="Sampled prefixes start from the BOS token ('bos', ROME) or from 'The', 'Therefore', "
                          "'Because', 'I', 'You' ('words', MEMIT/EMMET, EasyEdit's ROME). Default: the method's.")
    key_average: Literal["uniform", "types"] | None = Field(
        None, description="Key average over the templates: 'uniform' (ROME: 1/(1+prefixes) each) or 'types' "
                          "(MEMIT/EMMET: ½ plain + ½ mean of the prefixed). Default: the method's reference.")
    target_space: bool = Field(True, description="Prepend a space to targets that start without one (both "
                                                 "reference codes do; CounterFact's targets have none).")
    metrics: bool = Field(True, description="Measure efficacy, paraphrase and neighbourhood before/after.")
    eval_data: str | None = Field(None, description="Text for perplexity before/after (file or 'model[:N]').")

    def stats_token_count(self, d_k: int) -> int:
        """Tokens for C: ``stats_tokens``, else the default for ``stats_data`` (see :mod:`.stats`); also used by
        the ``--dry-run`` memory estimate."""
        from .stats import default_stats_tokens

        return self.stats_tokens or default_stats_tokens(d_k, self.stats_data)

    @field_validator("requests")
    @classmethod
    def _requests_nonempty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("no requests given")
        if isinstance(v, str) and not v.strip():
            raise ValueError("requests: empty path")
        return v


def reference_defaults(method: Method, family: str, n_layers: int = 0) -> tuple[int, float, float, float]:
    """(steps, weight decay, clamp, λ′) the reference ships for this method and model (§4.5)."""
    exact = EXACT_DEFAULTS.get((method, family, n_layers))
    return exact if exact is not None else DEFAULTS[method].get(family, DEFAULTS[method]["*"])


def style(method: Method, params: EditParams) -> dict[str, str]:
    """The method's reference style with the user's overrides."""
    return {k: getattr(params, k) or v for k, v in STYLE[method].items()}


def settings_for(method: Method, family: str, params: EditParams, n_layers: int = 0
                 ) -> tuple[kv.ValueSettings, float]:
    steps, wd, clamp, lam = reference_defaults(method, family, n_layers)
    st = style(method, params)
    s = kv.ValueSettings(steps=params.steps or steps, lr=params.lr,
                         weight_decay=wd if params.weight_decay is None else params.weight_decay,
                         clamp=params.clamp or clamp, kl_factor=params.kl_factor,
                         norm_reference=st["norm_reference"], uniform_keys=st["key_average"] == "uniform")
    return s, lam


def edit_requests(params: EditParams, ctx) -> list[Request]:
    """The requests, with the reference's leading space on bare targets unless ``target_space`` is off."""
    requests = resolve_requests(params.requests, ctx)
    return with_leading_space(requests) if params.target_space else requests


def prefixes_for(method: Method, graph, tok, params: EditParams, ctx) -> list[str]:
    """The sampled prefixes (sampled on the model engine with its KV cache), or none."""
    n_pre = n_prefixes(method, params)
    if n_pre == 0:
        return []
    return pf.sample_prefixes(mx.EngineScorer(graph, ctx), tok, pf.prefix_lengths(method, n_pre), seed=ctx.seed_for(0),
                              seeds=style(method, params)["prefix_seeds"])


def n_prefixes(method: Method, params: EditParams) -> int:
    return N_PREFIXES[method] if params.n_prefixes is None else params.n_prefixes


def _weight_linear(w: torch.Tensor, site: EditSite) -> torch.Tensor:
    """The edited weight in Linear orientation [d_out, d_k], fp32."""
    w = w.detach()
    return (w.T if site.transposed else w).float()


def covariance(graph, ctx, site: EditSite, params: EditParams):
    """The CholeskyFactor of C (or of I with --no-cov) and facts for the report."""
    from surgeon.kernels.covariance import CholeskyFactor

    from .stats import key_statistics

    if not params.cov or params.stats_data == "identity":
        return CholeskyFactor.identity(site.d_k, device=ctx.device), {"stats": "identity (C = I, unconstrained)"}
    n_tokens = params.stats_token_count(site.d_k)
    t0 = time.perf_counter()
    st = key_statistics(graph, ctx, site, spec=params.stats_data, n_tokens=n_tokens, seqlen=params.stats_seqlen,
                        use_cache=params.stats_cache)
    factor = CholeskyFactor(st.mom2, device=ctx.device)
    info = {"stats": st.source, "stats_tokens": st.count, "stats_seconds": round(time.perf_counter() - t0, 3),
            "stats_data": params.stats_data}
    if st.path is not None:
        info["stats_file"] = str(st.path)
    if factor.jitter:
        info["stats_jitter"] = factor.jitter
        ctx.log(f"[yellow]covariance is rank-deficient at {site.name}: added {factor.jitter:g}·mean(diag)·I "
                f"(use more --stats-tokens)[/]")
    return factor, info


def write_back(graph, edits: Sequence[tuple[EditSite, Sequence[torch.Tensor], Sequence[torch.Tensor]]],
               ctx, requests: Sequence[Request] = (), op: str = "edit",
               keys: dict[str, torch.Tensor] | None = None) -> None:
    """Put ΔW = Σ up@down of each edited tensor into the graph as one low-rank node, and the factors and the
    original tensors into ``edits.safetensors`` (attached through ``ctx``: deterministic bytes); this step's
    factors and ``requests`` are also recorded in the graph for later steps (:mod:`surgeon.edits`)."""
    from surgeon.edits import record_edit
    from surgeon.graph import Executor, LowRank

    tensors: dict[str, torch.Tensor] = {}
    for site, ups, downs in edits:
        # fp32 factors: the node and edits.safetensors hold the very numbers that are added to the weight
        up, down = torch.cat(list(ups), 1).float(), torch.cat(list(downs), 0).float()
        record_edit(graph, tensor=site.name, up=up, down=down, transposed=site.transposed, op=op,
                    requests=[r.model_dump(mode="json", by_alias=False) for r in requests],
                    keys=(keys or {}).get(site.name))
        node = graph[site.name]
        if isinstance(node, LowRank) and node.transposed == site.transposed:
            base, up, down = node.inputs[0], torch.cat([node.up, up], 1), torch.cat([node.down, down], 0)
        else:
            base = node
        graph.replace(site.name, LowRank(base, up, down, transposed=site.transposed, label="edit"))
        original = Executor([base]).evaluate_all()[0]
        tensors.update({f"{site.name}.up": up.contiguous(), f"{site.name}.down": down.contiguous(),
                        f"{site.name}.original": original.contiguous()})
    ctx.attach(graph, "edits.safetensors", tensors,
               metadata={"delta": "W_linear += up @ down (transpose for Conv1D)",
                         "transposed": ",".join(str(e[0].transposed).lower() for e in edits),
                         "tensor": ",".join(e[0].name for e in edits)})


def warn_duplicates(requests: list[Request], ctx) -> None:
    dups = duplicate_subjects(requests)
    if dups:
        ctx.log("[yellow]subjects requested more than once: " + ", ".join(f"{s!r}×{n}" for s, n in dups.items())
                + " — their later requests go into later batches (applied on top)[/]")


@dataclass
class Baseline:
    """The unedited model's metrics: per-request answers (``None`` without --metrics) and perplexity."""

    before: Any
    ppl_windows: torch.Tensor | None
    ppl: dict[str, float]


def measure_before(graph, tok, requests: list[Request], params: EditParams, ctx,
                   timings: dict[str, float]) -> Baseline:
    """The unedited model's metrics and perplexity, on the model engine (nothing without --metrics/--eval-data)."""
    if not (params.metrics or params.eval_data):
        return Baseline(None, None, {})
    scorer = mx.EngineScorer(graph, ctx)
    before = None
    if params.metrics:
        t0 = time.perf_counter()
        before = mx.before_edit(scorer, tok, requests)
        timings["metrics_before_s"] = time.perf_counter() - t0
    windows = ctx.tokens(params.eval_data, graph, seqlen=128, max_windows=16) if params.eval_data else None
    ppl = {"perplexity_before": scorer.perplexity(windows)} if windows is not None else {}
    return Baseline(before, windows, ppl)


def measure_after(graph, tok, requests: list[Request], base: Baseline, result: dict[str, Any], ctx,
                  timings: dict[str, float]) -> None:
    """Metrics of the edited ``graph`` into ``result`` (and a table in the log), on the model engine."""
    if base.before is None and base.ppl_windows is None:
        return
    scorer = mx.EngineScorer(graph, ctx)
    if base.before is not None:
        t0 = time.perf_counter()
        result.update(mx.after_edit(scorer, tok, requests, base.before))
        timings["metrics_after_s"] = time.perf_counter() - t0
    ppl = dict(base.ppl)
    if base.ppl_windows is not None:
        ppl["perplexity_after"] = scorer.perplexity(base.ppl_windows)
        result.update({k: round(v, 4) for k, v in ppl.items()})
    ctx.log(mx.metrics_table(result["title"], {k: v for k, v in result.items() if k not in ("kind", "title")}))


def edit_batches(graph, tok, site: EditSite, batches: list[list[Request]], prefixes: list[str],
                 settings: kv.ValueSettings, factor, lam: float, method: Method, ctx, timings: dict[str, float], *,
                 residual: str, ridge_single: bool, keys_out: list[torch.Tensor] | None = None):
    """Values (on the model engine, :mod:`.engine_values`), then the closed-form update, for each batch in turn;
    the next batch runs on a working copy of ``graph`` whose edited tensor holds the earlier updates (fp32).
    Returns (ups, downs, per-edit facts, the working graph with every update in fp32); each batch's keys
    [d_k, n] go into ``keys_out``."""
    from surgeon.graph import Const

    from .engine_values import optimise_values_engine

    ups, downs, per_edit = [], [], []
    work = graph.copy()
    w = _weight_linear(graph.value(site.name), site)
    b = graph.value(site.bias_name).float() if site.bias_name else None
    t_values = t_solve = 0.0
    for batch in ctx.progress(batches, description=f"{method} batches"):
        t = time.perf_counter()
        # keys come from the values' first forward pass: the same rows, cut at the same token
        vals = optimise_values_engine(work, ctx, site, tok, batch, prefixes, settings, status=ctx.status)
        keys = vals.keys
        if keys_out is not None:
            keys_out.append(keys.detach().float().cpu())
        t_values += time.perf_counter() - t
        t = time.perf_counter()
        if method == "rome":
            up, down = rome_update(w, keys[:, 0], vals.values[:, 0], factor, bias=b)
        else:
            up, down = emmet_update(w, keys, vals.values, factor, lam, bias=b, ridge_single=ridge_single,
                                    initial=vals.initial if residual == "delta" else None)
        t_solve += time.perf_counter() - t
        per_edit.extend(_batch_facts(batch, vals, w, b, keys, up, down))
        w = w + (up.double() @ down.double()).float()
        work.replace(site.name, Const((w.T if site.transposed else w).contiguous(), label="edit"))
        ups.append(up)
        downs.append(down)
    timings.update(keys_values_s=t_values, solve_s=t_solve)
    return ups, downs, per_edit, work


def _batch_facts(batch, vals, w, b, keys, up, down) -> list[dict[str, Any]]:
    """Per request: the value optimisation's outcome and how well the new weight maps its key to its value (0 for
    ROME, small for EMMET with small λ′); the batch's ‖ΔW‖ on its last entry."""
    new_w = w.double() + up.double() @ down.double()
    out = new_w @ keys.double() + (b.double()[:, None] if b is not None else 0)
    miss = ((out - vals.values.double()).norm(dim=0) / vals.values.double().norm(dim=0)).tolist()
    facts = [{"subject": r.subject, "target": r.target, "value_loss": round(vals.losses[j], 4),
              "value_target_prob": round(vals.target_prob[j], 4), "value_steps": vals.steps[j],
              "constraint_rel_error": float(f"{miss[j]:.3g}")} for j, r in enumerate(batch)]
    facts[-1]["batch_delta_norm"] = round((up.double() @ down.double()).norm().item(), 4)
    return facts


def run_edit(graph, params: EditParams, ctx, method: Method, *, lam: float | None = None,
             batch_size: int = 1, residual: str = "paper", ridge_single: bool = False) -> Any:
    """Edit ``graph`` with ROME (one request at a time) or EMMET (batches of unique subjects)."""
    requests = edit_requests(params, ctx)
    if method == "emmet":
        warn_duplicates(requests, ctx)
    site = locate(graph, params.layer, ctx.roles(graph))
    graph = graph.copy()
    timings: dict[str, float] = {}
    tok = ctx.tokenizer(graph)
    settings, default_lam = settings_for(method, site.family, params, site.n_layers)
    lam = default_lam if lam is None else lam
    ctx.log(f"{method}: {len(requests)} request(s) into {site.name} (layer {site.layer}: {site.rule})")
    t0 = time.perf_counter()
    factor, stats_info = covariance(graph, ctx, site, params)
    timings["stats_s"] = time.perf_counter() - t0
    base = measure_before(graph, tok, requests, params, ctx, timings)
    t0 = time.perf_counter()
    prefixes = prefixes_for(method, graph, tok, params, ctx)
    timings["prefixes_s"] = time.perf_counter() - t0
    batches = [[r] for r in requests] if method == "rome" else subject_batches(requests, batch_size)
    keys: list[torch.Tensor] = []
    ups, downs, per_edit, work = edit_batches(graph, tok, site, batches, prefixes, settings, factor, lam, method,
                                              ctx, timings, residual=residual, ridge_single=ridge_single,
                                              keys_out=keys)
    write_back(graph, [(site, ups, downs)], ctx, requests, op=f"edit.{method}",
               keys={site.name: torch.cat(keys, 1)})
    result: dict[str, Any] = {"kind": f"edit.{method}", "title": f"Knowledge edit ({method.upper()})",
                              "requests": len(requests), "layer": site.layer}
    measure_after(work, tok, requests, base, result, ctx, timings)
    graph.results.append(result)
    notes = [(f"{method.upper()} edit of {len(requests)} fact(s) in `{site.name}` (layer {site.layer}); "
              "factors and the original tensor are in `edits.safetensors`.")]
    if len(requests) > SEQUENTIAL_WARNING and method == "rome":
        notes.append(f"{len(requests)} sequential ROME edits: general abilities are known to degrade past a few "
                     "dozen sequential edits (arXiv 2410.18785); check perplexity.")
        ctx.log(f"[yellow]{notes[-1]}[/]")
    ctx.report(method=method, tensor=site.name, layer=site.layer, layer_rule=site.rule, family=site.family,
               lam=lam if method == "emmet" else 0.0, batches=len(batches), n_prefixes=len(prefixes),
               style=style(method, params), **({"residual": residual} if method == "emmet" else {}),
               value_settings=vars(settings), **stats_info, edits=per_edit, metrics=result,
               timings_s={k: round(v, 3) for k, v in timings.items()}, card_notes=notes)
    graph.tags = sorted(set(graph.tags) | {"knowledge-editing", method})
    return graph
