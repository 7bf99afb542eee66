"""OPCM: orthogonal-projection continual merging (Tang et al., NeurIPS 2025, arXiv 2501.09522; ALGORITHMS.md §3.3).

Models arrive one by one. For each 2-D weight, the new task vector τ_t is projected off the leading singular
directions of the current merged task vector, added to the running sum, and the merge is rescaled so that its
distance to the base equals the mean task-vector norm:

    S_1 = τ_1;   S_t = S_{t−1} + τ̃_t,   τ̃_t = τ_t − U_k (M ⊙ U_kᵀ τ_t V_k) V_kᵀ,   S_{t−1} = U_k Σ V_kᵀ (reduced SVD)
    M marks the diagonal and the leading r_α × r_α block, r_α = first (0-based) k with cumsum(σ)_k / Σσ > α
    λ_t = ‖S_t‖ / mean(‖τ_1‖ … ‖τ_t‖)   (norms over every merged tensor),   θ^(t) = θ_b + S_t / λ_t

This is the reference's recursion (θ^(t−1) − θ_b = S_{t−1}/λ_{t−1}, and the projection only depends on the
directions of S_{t−1}); other tensors (norms, biases, embeddings) take τ_t unprojected.

Streaming: the sum S_T depends on no global quantity, so one pass over tensors computes it for all models
(holding base, S and one τ per tensor) and spills it as fp32 to the state folder while summing the norms; the
output graph is then ``θ_b + S_T/λ_T`` read back lazily. The state (S_T, Σ‖τ_i‖, count, α) has the size of one
model whatever the number of merged models, and ``--resume STATE`` continues it with later arrivals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from surgeon.ops.merge.inputs import (
    MergeInputs,
    MergeParams,
    cast_node,
    check_compatible,
    gather_inputs,
    out_dtype,
)

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Graph, Load
from surgeon.registry import register

STATE_TENSORS = "opcm_sum.safetensors"
STATE_JSON = "opcm_state.json"
STATE_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# pure math


def rank_alpha(s: torch.Tensor, alpha: float) -> int:
    """First 0-based k with cumsum(σ)_k / Σσ > α (the reference code's r_α; its docs are off by one).

    As the reference (``argmax`` of the boolean test), no k passing the test gives 0: at α = 1 only the diagonal
    is removed, not the whole block. The ratio is computed in σ's dtype, as there.
    """
    total = s.sum()
    if float(total) <= 0:
        return 0
    hits = torch.nonzero(torch.cumsum(s, 0) / total > alpha)
    return int(hits[0]) if hits.numel() else 0


def projection_mask(k: int, r_alpha: int) -> torch.Tensor:
    """M (k×k): True on the diagonal and on the leading r_α × r_α block (the components removed from τ)."""
    m = torch.eye(k, dtype=torch.bool)
    m[:r_alpha, :r_alpha] = True
    return m


def opcm_project(tau: torch.Tensor, merged: torch.Tensor, alpha: float, *, device: str = "cpu") -> tuple[torch.Tensor, int]:
    """τ̃ = τ − U_k (M ⊙ U_kᵀ τ V_k) V_kᵀ with the reduced SVD of ``merged``; returns (τ̃, r_α).

    A zero ``merged`` (nothing to be orthogonal to) leaves τ unchanged.
    """
    from surgeon.kernels.linalg import svd

    tau = tau.float()
    if not bool(merged.any()):
        return tau.clone(), 0
    u, s, vh = svd(merged.float(), device=device)
    r = rank_alpha(s, alpha)
    p = u.T @ tau @ vh.T
    removed = p * projection_mask(s.numel(), r)
    return tau - u @ removed @ vh, r


def projected(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors are projected: 2-D weights other than input/position embeddings."""
    leaf = name.lower()
    return len(shape) == 2 and not any(k in leaf for k in ("embed_tokens", "wte.", "wpe.", "embed_positions",
                                                               "word_embeddings", "position_embeddings"))


# ---------------------------------------------------------------------------------------------------------
# op


class OpcmParams(MergeParams):
    alpha: float = Field(0.5, gt=0, le=1, description=(
        "α: the leading singular directions holding this fraction of the merged task vector's singular-value "
        "mass are protected (0.3-0.7 in the paper's docs)."))
    state: str | None = Field(None, description=(
        "Folder to save the merge state in, so that later models can be merged with --resume (default: a "
        "temporary folder removed at exit)."))
    resume: str | None = Field(None, description="State folder of an earlier OPCM run to continue with the new models.")


@dataclass
class _Running:
    """What the state carries between runs: S_{t} (lazily read), count, Σ‖τ_i‖ and the λ history."""

    prev: Any = None  # the earlier S_T as a lazily read checkpoint (ctx.state(...).tensors)
    count: int = 0
    norm_sum: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def _resumed(params: OpcmParams, ctx: Context, merged_names: list[str], base: Graph) -> _Running:
    """The running merge of ``--resume`` (checked against α, the tensor set and the base's shapes), or a fresh one."""
    if params.resume is None:
        return _Running()
    folder = ctx.state(params.resume, what="--resume")
    if not folder.has(STATE_JSON) or not folder.has(STATE_TENSORS):
        raise SurgeonError(f"--resume {params.resume}: not an OPCM state folder (expected {STATE_JSON} and "
                           f"{STATE_TENSORS})")
    meta = folder.read_json(STATE_JSON)
    where = f"--resume {params.resume}"
    if meta.get("version") != STATE_VERSION:
        raise SurgeonError(f"{where}: {STATE_JSON} has state version {meta.get('version')!r}, expected {STATE_VERSION}")
    if abs(float(meta["alpha"]) - params.alpha) > 1e-12:
        raise SurgeonError(f"{where}: state was built with alpha {meta['alpha']}, got {params.alpha}")
    if meta["tensors"] != merged_names:
        missing = sorted(set(meta["tensors"]) ^ set(merged_names))
        raise SurgeonError(f"{where}: the state covers other tensors than this base "
                           f"(first difference: {missing[0] if missing else 'order'!r})")
    if meta.get("base_shapes") != {n: list(base[n].shape) for n in merged_names}:
        raise SurgeonError(f"{where}: the state was built on a base with other shapes")
    return _Running(folder.tensors(STATE_TENSORS), int(meta["count"]), float(meta["task_norm_sum"]),
                    list(meta["history"]))


@dataclass
class _Sums:
    """Per new model i (over all merged tensors): ‖τ_i‖², ‖S_i‖²; and r_α per projected tensor."""

    sq_tau: list[float]
    sq_sum: list[float]
    ranks: dict[str, list[int]]


def _accumulate(inputs: MergeInputs, merged_names: list[str], running: _Running, spill: Any,
                alpha: float, ctx: Context) -> _Sums:
    """One pass over the tensors: S ← S + τ̃_i for every new model, S_T spilled tensor by tensor."""
    base = inputs.base
    assert base is not None
    sums = _Sums([0.0] * inputs.n, [0.0] * inputs.n, {})
    for t in ctx.progress(merged_names, total=len(merged_names), description="opcm"):
        b = base.value(t).float()
        s = running.prev.load(t).float() if running.prev is not None else None
        proj = projected(t, tuple(b.shape))
        for i, g in enumerate(inputs.graphs):
            tau = g.value(t).float() - b
            sums.sq_tau[i] += float(tau.pow(2).sum())
            if s is None:
                s = tau
            else:
                if proj:
                    tau, r = opcm_project(tau, s, alpha, device=ctx.device)
                    sums.ranks.setdefault(t, []).append(r)
                s = s + tau
            sums.sq_sum[i] += float(s.pow(2).sum())
            del tau
        spill.write(t, s)
        del s, b
    return sums


def _lambdas(running: _Running, sums: _Sums, names: list[str]) -> list[float]:
    """λ_t = ‖S_t‖ / mean(‖τ_1‖ … ‖τ_t‖) after each new model; updates ``running`` (count, Σ‖τ‖, history)."""
    lambdas = []
    for i, name in enumerate(names):
        running.count += 1
        running.norm_sum += math.sqrt(sums.sq_tau[i])
        mean_norm = running.norm_sum / running.count
        lam = math.sqrt(sums.sq_sum[i]) / mean_norm if mean_norm > 0 else 1.0
        lambdas.append(lam)
        running.history.append({"model": name, "lambda": lam, "task_norm": math.sqrt(sums.sq_tau[i]),
                                "merged_sum_norm": math.sqrt(sums.sq_sum[i])})
    return lambdas


def _output(base: Graph, plan: dict[str, str], state_ck: Any, lam: float, params: OpcmParams) -> Graph:
    """θ_b + S_T/λ_T per merged tensor (S_T read back lazily from the state); other tensors copied or cast."""
    g = base.copy()
    inv = 1.0 / lam
    for t, kind in plan.items():
        node = base[t]
        if kind != "merge":
            if (cast := cast_node(params, node)) is not node:
                g.replace(t, cast)
            continue
        g.replace(t, Apply(lambda bv, sv, inv=inv: bv.float() + sv * inv, [node, Load(state_ck, t)],
                           label="merge-opcm", dtype=out_dtype(params, node)))
    g.tags = sorted(set(g.tags) | {"merge", "opcm"})
    return g


@register("merge.opcm", OpcmParams, multi_model=True,
          summary="Orthogonal-projection continual merging (OPCM).")
def merge_opcm(graph: Graph, params: OpcmParams, ctx: Context) -> Graph:
    """Merge fine-tunes in order, projecting each task vector off the merge's leading singular directions and
    rescaling to the mean task norm; --state/--resume let later models join."""
    op = "merge opcm"
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=1, op=op)
    plan = check_compatible(inputs, params, op=op)
    merged_names = [t for t, k in plan.items() if k == "merge"]
    base = inputs.base
    assert base is not None
    running = _resumed(params, ctx, merged_names, base)
    # the new state: --state, else a temporary folder that lives as long as the returned graph reads it
    folder = ctx.state(params.state or None, what="--state")
    spill = folder.spill(STATE_TENSORS, {t: tuple(base[t].shape) for t in merged_names})
    try:
        sums = _accumulate(inputs, merged_names, running, spill, params.alpha, ctx)
    except BaseException:
        spill.abort()
        raise
    spill.close()
    lambdas = _lambdas(running, sums, inputs.names)
    lam_t = lambdas[-1] if lambdas[-1] > 0 else 1.0
    count, norm_sum = running.count, running.norm_sum
    folder.write_json(STATE_JSON, {
        "version": STATE_VERSION, "alpha": params.alpha, "count": count, "task_norm_sum": norm_sum,
        "lambda": lam_t, "tensors": merged_names, "base_shapes": {n: list(base[n].shape) for n in merged_names},
        "base": inputs.base_name, "history": running.history})
    g = _output(base, plan, folder.tensors(STATE_TENSORS), lam_t, params)
    r_summary = {t: v for t, v in list(sums.ranks.items())[:8]}
    ctx.report(method="opcm", models=inputs.names, base=inputs.base_name, alpha=params.alpha, lambdas=lambdas,
               count=count, mean_task_norm=norm_sum / count, state=None if folder.temporary else str(folder.path),
               resumed_from=params.resume, r_alpha_first_tensors=r_summary)
    ctx.log(f"opcm: λ per step {', '.join(f'{x:.3f}' for x in lambdas)}; merged {count} model(s) in total")
    return g
