"""``edit.alphaedit``: MEMIT's multi-layer edit with every update projected onto the null space of the preserved
keys (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing", arXiv 2410.02355, ICLR 2025;
``jianghoucheng/AlphaEdit`` ``AlphaEdit_main.py``, projector in ``experiments/evaluate.py``).

Per edited layer l: P_l = ÛÛᵀ from C_l = E[kkᵀ] of the unedited model (eigenvalues below ``nullspace_threshold``,
cached through ``ctx.cache("projector", …)``). Requests go in sequential batches; for each batch z = h_L + δ at
the last layer, then layer by layer (MEMIT's order and residual split, :mod:`.memit`) ΔW_l = R_l K_lᵀ P_l
(K_pK_pᵀP_l + K_lK_lᵀP_l + αI)⁻¹ (:func:`.nullspace.projected_update`), and after the batch its keys (with the
edited weights) join K_p. Efficacy of every earlier batch is measured after each batch.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from pydantic import Field

from surgeon.errors import SurgeonError
from surgeon.registry import register

from . import metrics as mx
from .editing import EditParams, measure_after, measure_before, prefixes_for, settings_for, style, write_back
from .memit import multilayer_setup, spread_batch, z_facts
from .nullspace import nullspace_basis, projected_update, projector
from .requests import Request, subject_batches
from .site import EditSite

PROJECTOR_VERSION = "1"
#: the reference hparams (hparams/AlphaEdit/{gpt2-xl,EleutherAI_gpt-j-6B,Llama3-8B}.json) all use these two
REFERENCE_L2 = 10.0
REFERENCE_THRESHOLD = 2e-2


class Params(EditParams):
    """AlphaEdit knobs: those of :class:`EditParams` plus MEMIT's layers and the null-space settings."""

    layers: list[int] | None = Field(None, description="Layers whose MLP down-projections share each edit "
                                                       "(default: MEMIT's reference range for the family, scaled).")
    l2: float = Field(REFERENCE_L2, ge=0, description="α, the L2 weight on ΔW in (P(K₁K₁ᵀ + K_pK_pᵀ) + αI)⁻¹ "
                                                      "(reference: 10).")
    nullspace_threshold: float = Field(REFERENCE_THRESHOLD, gt=0, description="Eigenvalues of C = E[kkᵀ] below "
                                       "this span the preserved keys' null space (reference: 2e-2).")
    batch_size: int = Field(100, ge=1, le=1024, description="Unique subjects per sequential batch (the "
                                                            "reference's sequential runs use 100).")
    track_batches: bool = Field(True, description="After each batch, measure efficacy of every batch so far.")


def projector_for(graph, ctx, site: EditSite, params: Params) -> tuple[torch.Tensor, dict[str, Any]]:
    """P for ``site`` (fp64) and facts for the report. The basis Û is cached under the statistics' key and the
    threshold; ``--no-cov`` (no statistics) gives P = I, i.e. MEMIT's sequential update without projection."""
    if not params.cov or params.stats_data == "identity":
        return torch.eye(site.d_k, dtype=torch.float64), {"nullspace_dim": site.d_k, "projector": "identity"}
    from .stats import key_statistics

    st = key_statistics(graph, ctx, site, spec=params.stats_data,
                        n_tokens=params.stats_token_count(site.d_k), seqlen=params.stats_seqlen,
                        use_cache=params.stats_cache)
    source = st.key or hashlib.sha256(st.mom2.contiguous().numpy().tobytes()).hexdigest()
    key = hashlib.sha256(f"{PROJECTOR_VERSION}:{source}:{params.nullspace_threshold!r}".encode()).hexdigest()[:32]
    entry = ctx.cache("projector", key)
    hit = entry.load() if params.stats_cache else None
    if hit is not None and "basis" in hit and hit["basis"].shape[0] == site.d_k:
        basis, how = hit["basis"].double(), "cache"
    else:
        basis, _ = nullspace_basis(st.mom2, params.nullspace_threshold)
        how = "computed"
        if params.stats_cache:
            entry.save({"basis": basis.contiguous()}, {"module": site.name, "threshold": repr(params.nullspace_threshold),
                                                       "stats_key": source, "version": PROJECTOR_VERSION})
    dim = int(basis.shape[1])
    ctx.log(f"null space of {site.name}: {dim}/{site.d_k} dimensions (threshold {params.nullspace_threshold:g}, {how})")
    if dim == 0:
        raise SurgeonError(f"--nullspace-threshold {params.nullspace_threshold:g}: no eigenvalue of C at {site.name} "
                           "is below it, so every update would be projected to zero; raise the threshold")
    return projector(basis), {"nullspace_dim": dim, "projector": how, "stats_tokens": st.count,
                              "stats": st.source}


def subset_before(before: mx.Before, idx: list[int]) -> mx.Before:
    """The unedited model's answers for the requests ``idx`` (neighbour owners renumbered)."""
    where = {j: n for n, j in enumerate(idx)}
    keep = [i for i, o in enumerate(before.neighbor_owner) if o in where]
    return mx.Before([before.target[j] for j in idx], [before.old[j] for j in idx],
                     [before.neighbor_prompts[i] for i in keep], [where[before.neighbor_owner[i]] for i in keep],
                     [before.neighbor_old[i] for i in keep])


def batch_history(graph, tok, batches: list[list[Request]], index: list[list[int]], before: mx.Before,
                  done: int, ctx) -> list[dict[str, Any]]:
    """Metrics of batches 0..done-1 on ``graph`` (the model after ``done`` batches): every item judged in one
    evaluation on the model engine, then shares per batch."""
    idx = [k for b in range(done) for k in index[b]]
    judged = mx.judge(mx.EngineScorer(graph, ctx), tok, [r for b in batches[:done] for r in b],
                      subset_before(before, idx))
    rows, start = [], 0
    for b in range(done):
        m = mx.summarize(judged, range(start, start + len(batches[b])))
        start += len(batches[b])
        rows.append({"batch": b + 1, **{k: m.get(k) for k in ("efficacy", "efficacy_greedy", "paraphrase",
                                                                "neighborhood")}})
    return rows


def _alphaedit_batches(graph, tok, sites, projs, batches, prefixes, settings, params: Params, ctx, base, index,
                       timings: dict[str, float]):
    """Values, projected spread (:func:`.memit.spread_batch` with AlphaEdit's solve) and K_p accumulation per
    batch; returns (per layer the (up, down) of each batch, per-edit facts, per-batch history, the working graph
    with every update in fp32)."""
    from surgeon.engine import SpillStore

    work, spill = graph.copy(), SpillStore(getattr(ctx, "work_dir", None))
    previous = [torch.zeros(s.d_k, s.d_k, dtype=torch.float64) for s in sites]  # K_pK_pᵀ per layer
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in sites]
    per_edit: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    timings.update(keys_values_s=0.0, spread_s=0.0)
    for n, batch in enumerate(ctx.progress(batches, description="alphaedit batches")):
        vals, res = spread_batch(work, ctx, tok, sites, batch, prefixes, settings,
                                 lambda i, r, k: projected_update(r, k, projs[i], previous[i], params.l2), spill,
                                 timings)
        for i, k in enumerate(res.keys):  # this batch's keys, with the edited weights, join K_p
            previous[i] += k.double() @ k.double().T
        per_edit.extend(z_facts(batch, vals, res, batch=n + 1))
        for acc, part in zip(per_layer, res.parts):
            acc.append(part)
        if base.before is not None and params.track_batches:
            rows = batch_history(work, tok, batches, index, base.before, n + 1, ctx)
            history.append({"after_batch": n + 1, "batches": rows})
            ctx.log(f"after batch {n + 1}: efficacy per batch "
                    + ", ".join(f"{r['efficacy']}" for r in rows))
    return per_layer, per_edit, history, work


@register("edit.alphaedit", Params, model_level=True,
          summary="AlphaEdit: MEMIT edits projected onto the preserved keys' null space.")
def apply(graph, params: Params, ctx):
    """Rewrite all requests' facts in sequential batches, each update projected onto the preserved keys' null
    space and kept off the earlier batches' keys."""
    graph, requests, layers, rule, sites, timings, tok = multilayer_setup(graph, params, ctx, "edit.alphaedit")
    # the reference's value settings equal MEMIT's for GPT-2 and GPT-J; other families take MEMIT's (docs/edit.md)
    settings, _ = settings_for("memit", sites[-1].family, params, sites[-1].n_layers)
    ctx.log(f"alphaedit: {len(requests)} request(s) into layers {layers} ({rule}), α {params.l2:g}, "
            f"threshold {params.nullspace_threshold:g}")
    t0 = time.perf_counter()
    projs, null_info = [], []
    for s in sites:  # every P from the unedited model, as the reference computes it up front
        p, info = projector_for(graph, ctx, s, params)
        projs.append(p)
        null_info.append(info)
    timings["projector_s"] = time.perf_counter() - t0
    base = measure_before(graph, tok, requests, params, ctx, timings)
    t0 = time.perf_counter()
    prefixes = prefixes_for("memit", graph, tok, params, ctx)
    timings["prefixes_s"] = time.perf_counter() - t0
    batches = subject_batches(requests, params.batch_size)
    index = _batch_index(batches)
    per_layer, per_edit, history, work = _alphaedit_batches(graph, tok, sites, projs, batches, prefixes, settings,
                                                            params, ctx, base, index, timings)
    write_back(graph, [(s, [u for u, _ in acc], [d for _, d in acc]) for s, acc in zip(sites, per_layer)], ctx,
               requests, op="edit.alphaedit")
    result: dict[str, Any] = {"kind": "edit.alphaedit", "title": "Knowledge edit (AlphaEdit)",
                              "requests": len(requests), "layers": layers, "batches": len(batches)}
    if history:
        last = history[-1]["batches"]
        result["batch_efficacy"] = [r["efficacy"] for r in last]
        result["first_batch_efficacy"] = last[0]["efficacy"]
    measure_after(work, tok, requests, base, result, ctx, timings)
    graph.results.append(result)
    notes = [(f"AlphaEdit of {len(requests)} fact(s) in {len(batches)} sequential batch(es) over layers {layers} "
              f"({', '.join(s.name for s in sites)}); factors and the original tensors are in `edits.safetensors`.")]
    ctx.report(method="alphaedit", tensors=[s.name for s in sites], layers=layers, layer_rule=rule,
               family=sites[-1].family, l2=params.l2, nullspace_threshold=params.nullspace_threshold,
               nullspace=null_info, batches=len(batches), n_prefixes=len(prefixes), style=style("memit", params),
               value_settings=vars(settings), edits=per_edit, batch_history=history, metrics=result,
               timings_s={k: round(v, 3) for k, v in timings.items()}, card_notes=notes)
    graph.tags = sorted(set(graph.tags) | {"knowledge-editing", "alphaedit"})
    return graph


def _batch_index(batches: list[list[Request]]) -> list[list[int]]:
    """Positions in the request list of each batch's requests (batches are consecutive runs of it)."""
    out, start = [], 0
    for b in batches:
        out.append(list(range(start, start + len(b))))
        start += len(b)
    return out
