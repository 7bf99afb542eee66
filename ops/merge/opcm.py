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

import json
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Graph, Load
from surgeon.ops.merge._common import MergeParams, check_compatible, gather_inputs, out_dtype
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


def opcm_project_full(tau: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference form with full square U, V (``full_matrices=True``): τ̃ = U P̃ Vᵀ. For tests."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    r = rank_alpha(s.float(), alpha)
    p = u.T @ tau.double() @ vh.T
    keep = torch.ones_like(p, dtype=torch.bool)
    k = min(p.shape)
    keep[:k, :k] &= ~projection_mask(k, r)
    return (u @ (p * keep) @ vh).float()


def projected(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors are projected: 2-D weights other than input/position embeddings."""
    leaf = name.lower()
    return len(shape) == 2 and not any(k in leaf for k in ("embed_tokens", "wte.", "wpe.", "embed_positions",
                                                               "word_embeddings", "position_embeddings"))


# ---------------------------------------------------------------------------------------------------------
# state spill: a safetensors file written header-first, tensor by tensor (shapes are known in advance)


class _SpillWriter:
    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n, shp in shapes.items():
            size = 4 * math.prod(shp)
            header[n] = {"dtype": "F32", "shape": list(shp), "data_offsets": [off, off + size]}
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
        self.fh = open(path, "wb")
        self.fh.write(len(raw).to_bytes(8, "little") + raw)
        self.order = list(shapes)
        self.i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.order[self.i] != name:
            raise SurgeonError(f"internal: OPCM state written out of order ({name!r})")
        self.fh.write(t.detach().float().contiguous().numpy().tobytes())
        self.i += 1

    def close(self) -> None:
        self.fh.close()


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


def _read_state(folder: Path) -> dict[str, Any]:
    meta_path = folder / STATE_JSON
    if not meta_path.is_file() or not (folder / STATE_TENSORS).is_file():
        raise SurgeonError(f"--resume {folder}: not an OPCM state folder (expected {STATE_JSON} and {STATE_TENSORS})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise SurgeonError(f"{meta_path}: invalid JSON ({e.msg})") from None
    if meta.get("version") != STATE_VERSION:
        raise SurgeonError(f"{meta_path}: state version {meta.get('version')!r}, expected {STATE_VERSION}")
    return meta


def _base_fingerprint(g: Graph) -> dict[str, list[int]]:
    return {n: list(g[n].shape) for n in g.names()}


@register("merge.opcm", OpcmParams, multi_model=True)
def merge_opcm(graph: Graph, params: OpcmParams, ctx: Context) -> Graph:
    """Merge fine-tunes in order, projecting each task vector off the merge's leading singular directions and
    rescaling to the mean task norm; --state/--resume let later models join."""
    from surgeon.checkpoint import open_file

    op = "merge opcm"
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=1, op=op)
    plan = check_compatible(inputs, params, op=op)
    merged_names = [t for t, k in plan.items() if k == "merge"]
    base = inputs.base
    assert base is not None

    prev = None
    count, norm_sum, history = 0, 0.0, []
    if params.resume is not None:
        rfolder = Path(params.resume)
        meta = _read_state(rfolder)
        if abs(float(meta["alpha"]) - params.alpha) > 1e-12:
            raise SurgeonError(f"--resume {rfolder}: state was built with alpha {meta['alpha']}, got {params.alpha}")
        if meta["tensors"] != merged_names:
            missing = sorted(set(meta["tensors"]) ^ set(merged_names))
            raise SurgeonError(f"--resume {rfolder}: the state covers other tensors than this base "
                               f"(first difference: {missing[0] if missing else 'order'!r})")
        if meta.get("base_shapes") != {n: list(base[n].shape) for n in merged_names}:
            raise SurgeonError(f"--resume {rfolder}: the state was built on a base with other shapes")
        prev = open_file(rfolder / STATE_TENSORS)
        count, norm_sum, history = int(meta["count"]), float(meta["task_norm_sum"]), list(meta["history"])

    # where the new state goes: --state, else a temporary folder that lives as long as the returned graph
    if params.state is not None:
        sfolder = Path(params.state)
        sfolder.mkdir(parents=True, exist_ok=True)
        tmp_state = None
    else:
        sfolder = Path(tempfile.mkdtemp(prefix="surgeon-opcm-"))
        tmp_state = sfolder
    spill_path = sfolder / (STATE_TENSORS + ".tmp")
    writer = _SpillWriter(spill_path, {t: tuple(base[t].shape) for t in merged_names})

    n_new = inputs.n
    sq_sum = [0.0] * n_new  # ‖S_t‖² per new step, over all tensors
    sq_tau = [0.0] * n_new  # ‖τ_t‖²
    ranks: dict[str, list[int]] = {}
    try:
        for t in ctx.progress(merged_names, total=len(merged_names), description="opcm"):
            b = base.value(t).float()
            s = prev.load(t).float() if prev is not None else None
            proj = projected(t, tuple(b.shape))
            for i, g in enumerate(inputs.graphs):
                tau = g.value(t).float() - b
                sq_tau[i] += float(tau.pow(2).sum())
                if s is None:
                    s = tau
                else:
                    if proj:
                        tau, r = opcm_project(tau, s, params.alpha, device=ctx.device)
                        ranks.setdefault(t, []).append(r)
                    s = s + tau
                sq_sum[i] += float(s.pow(2).sum())
                del tau
            writer.write(t, s)
            del s, b
    except BaseException:
        writer.close()
        spill_path.unlink(missing_ok=True)
        if tmp_state is not None:
            shutil.rmtree(tmp_state, ignore_errors=True)
        raise
    writer.close()
    os.replace(spill_path, sfolder / STATE_TENSORS)

    lambdas = []
    for i in range(n_new):
        count += 1
        norm_sum += math.sqrt(sq_tau[i])
        mean_norm = norm_sum / count
        lam = math.sqrt(sq_sum[i]) / mean_norm if mean_norm > 0 else 1.0
        lambdas.append(lam)
        history.append({"model": inputs.names[i], "lambda": lam, "task_norm": math.sqrt(sq_tau[i]),
                        "merged_sum_norm": math.sqrt(sq_sum[i])})
    lam_t = lambdas[-1] if lambdas[-1] > 0 else 1.0
    meta = {"version": STATE_VERSION, "alpha": params.alpha, "count": count, "task_norm_sum": norm_sum,
            "lambda": lam_t, "tensors": merged_names, "base_shapes": {n: list(base[n].shape) for n in merged_names},
            "base": inputs.base_name, "history": history}
    (sfolder / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")

    state_ck = open_file(sfolder / STATE_TENSORS)
    g = base.copy()
    inv = 1.0 / lam_t
    for t, kind in plan.items():
        node = base[t]
        if kind != "merge":
            if params.dtype is not None and node.dtype.is_floating_point and out_dtype(params, node) != node.dtype:
                g.nodes[t] = Apply(lambda x: x, [node], label="cast", dtype=out_dtype(params, node))
            continue
        g.nodes[t] = Apply(lambda bv, sv, inv=inv: bv.float() + sv * inv, [node, Load(state_ck, t)],
                           label="merge-opcm", dtype=out_dtype(params, node))
    if tmp_state is not None:  # remove the temporary state once no node reads it any more
        weakref.finalize(state_ck, shutil.rmtree, str(tmp_state), True)
    g.tags = sorted(set(g.tags) | {"merge", "opcm"})
    r_summary = {t: v for t, v in list(ranks.items())[:8]}
    ctx.report(method="opcm", models=inputs.names, base=inputs.base_name, alpha=params.alpha, lambdas=lambdas,
               count=count, mean_task_norm=norm_sum / count, state=None if tmp_state else str(sfolder),
               resumed_from=params.resume, r_alpha_first_tensors=r_summary)
    ctx.log(f"opcm: λ per step {', '.join(f'{x:.3f}' for x in lambdas)}; merged {count} model(s) in total")
    return g
