"""RMM: reversible merging of low-rank weights (Alipour & Mohammadi Amiri, arXiv 2510.14163; ALGORITHMS.md §3.4).

Instead of collapsing n low-rank task deltas ΔW_i = B_i A_i into one, RMM keeps a small basis per *position*
from which every task is rebuilt by a linear combination. A position is a row of B (d_out of them) or a column
of A (d_in); at each, the n tasks hold r-vectors X = [x_1 … x_n] ∈ ℝ^{r×n}. The closed-form least-squares
choice of a p-dimensional basis M and coefficients c_i minimising Σ_i ‖x_i − M c_i‖² is the top-p left singular
vectors of X (Eckart–Young) with c_i = Mᵀ x_i, so the reconstruction error at each position is exactly the
dropped singular energy Σ_{k>p} σ_k². ``center`` subtracts the per-position mean first (then p = n − 1 is exact).

Inputs: n PEFT LoRA adapters of one base (scale s folded into B), or n full fine-tunes compressed by PT-SVD at
rank r (B = U√Σ, A = √Σ Vᵀ of τ_i = θ_i − θ_b; 1-D deltas such as norms are kept densely).
Output folder: ``rmm.safetensors`` (per tensor ``<name>::B.basis`` [d_out, r, p], ``::B.coeffs`` [d_out, p, n],
``::A.basis`` [d_in, r, p], ``::A.coeffs`` [d_in, p, n], ``::B.mean``/``::A.mean`` when centred, ``::delta.<i>``
for dense 1-D deltas) and ``rmm.json`` (tasks, r, p, energy, storage ratio, per-task relative errors).
``surgeon merge revert OUT --task NAME -o DIR`` rebuilds that task as a PEFT adapter or (with ``--base``) a dense model.

[verify] Read from the paper: the abstract and a secondary summary (positions = rows of A / columns of B in the
paper's A ∈ ℝ^{m×r}, B ∈ ℝ^{r×d} naming, n task vectors per position, closed-form basis and coefficients). Not
confirmed: whether the paper centres X, aligns factor gauges first, or splits the PT-SVD singular values as √Σ.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from surgeon.ops.merge.inputs import MergeParams, check_compatible, gather_inputs

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph
from surgeon.registry import register

RMM_JSON = "rmm.json"
RMM_STEM = "rmm"

# ---------------------------------------------------------------------------------------------------------
# pure math


def rmm_fit(x: torch.Tensor, p: int, *, center: bool = False, device: str = "cpu"):
    """Per-position basis and coefficients for ``x`` [P, r, n] (P positions, r-vectors, n tasks).

    Returns ``(basis [P, r, p], coeffs [P, p, n], mean [P, r] or None, sq_sv [P, k])`` with ``sq_sv`` the squared
    singular values of each position's (centred) X, so the dropped energy is ``sq_sv[:, p:].sum()``.
    """
    from surgeon.kernels.linalg import svd

    x = x.float()
    mean = x.mean(-1) if center else None
    xc = x - mean[..., None] if mean is not None else x
    u, s, _ = svd(xc, device=device)
    if p > u.shape[-1]:
        raise SurgeonError(f"rmm: basis size p={p} exceeds min(r, n)={u.shape[-1]}")
    basis = u[..., :p].contiguous()
    coeffs = basis.transpose(-1, -2) @ xc
    return basis, coeffs.contiguous(), mean, s.pow(2)


def rmm_revert(basis: torch.Tensor, coeffs: torch.Tensor, mean: torch.Tensor | None, task: int) -> torch.Tensor:
    """x̂_i = μ + M c_i for every position: [P, r]."""
    out = (basis @ coeffs[..., task : task + 1]).squeeze(-1)
    return out + mean if mean is not None else out


def pt_svd(delta: torch.Tensor, rank: int, *, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Post-training SVD split of a dense delta: ``(A = √Σ Vᵀ [r, in], B = U√Σ [out, r])``."""
    from surgeon.ops.merge.mwa import refactorize

    return refactorize(delta, rank, device=device)


def lowrank_rel_error(b: torch.Tensor, a: torch.Tensor, b_hat: torch.Tensor, a_hat: torch.Tensor) -> tuple[float, float]:
    """(‖BA − B̂Â‖², ‖BA‖²) via r×r Gram matrices, never forming the d_out × d_in products."""
    b, a, b_hat, a_hat = (t.double() for t in (b, a, b_hat, a_hat))
    ref = float(torch.trace((b.T @ b) @ (a @ a.T)))
    est = float(torch.trace((b_hat.T @ b_hat) @ (a_hat @ a_hat.T)))
    cross = float(torch.trace((b.T @ b_hat) @ (a_hat @ a.T)))
    return max(ref + est - 2 * cross, 0.0), ref


# ---------------------------------------------------------------------------------------------------------
# params


class RmmParams(MergeParams):
    p: int = Field(2, ge=1, description="Basis size per position (the number of 'models' kept); must be < n.")
    rank: int = Field(16, ge=1, description="PT-SVD rank for full fine-tunes (ignored for LoRA adapters).")
    center: bool = Field(False, description="Subtract the per-position mean across tasks before fitting the basis.")
    coefficients: Literal["position", "tensor"] = Field("position", description=(
        "position: a basis and coefficients per row of B / column of A (as the paper's summary describes; "
        "stores p(r+n) numbers per position, vs r·n); tensor: one set of p coefficients per task and factor, "
        "the basis being p whole factors (stores about p models)."))


# ---------------------------------------------------------------------------------------------------------
# merge.rmm


def _task_factors(inputs, plan, params: RmmParams, ctx: Context):
    """{tensor: (kind, [(A_i [r, in], B_i [out, r]) per task], transposed)} and {tensor: [dense delta_i]}."""
    from surgeon.lora import adapter_folder, open_adapter

    ctx_graphs = dict(ctx.graphs)
    adapters = []
    for n in inputs.names:
        folder = adapter_folder(ctx_graphs.get(n, inputs.primary))
        adapters.append(open_adapter(folder) if folder is not None else None)
    if any(a is not None for a in adapters) and not all(a is not None for a in adapters):
        raise SurgeonError("merge rmm: mixing LoRA adapters and full fine-tunes")
    lowrank: dict[str, tuple[str, list[tuple[torch.Tensor, torch.Tensor]], bool]] = {}
    dense: dict[str, list[torch.Tensor]] = {}
    if adapters[0] is not None:
        for a in adapters:
            a.resolve(inputs.base, what=str(a.folder))
        mods = [sorted(a.modules) for a in adapters]
        if any(m != mods[0] for m in mods):
            raise SurgeonError("merge rmm: the adapters target different modules; RMM needs the same targets")
        ranks = {r for a in adapters for r in a.ranks}
        if len(ranks) != 1:
            raise SurgeonError(f"merge rmm: the adapters have different ranks {sorted(ranks)}; RMM needs one rank")
        fif = {a.fan_in_fan_out for a in adapters}
        if len(fif) != 1:
            raise SurgeonError("merge rmm: the adapters disagree on fan_in_fan_out")
        for m in mods[0]:
            lm = adapters[0].modules[m]
            facs = [a.factors(m, fold_scale=True) for a in adapters]
            lowrank[lm.target] = ("embedding" if lm.embedding else "linear", facs, adapters[0].fan_in_fan_out
                                  and not lm.embedding)
        if any(a.full_tensors for a in adapters):
            raise SurgeonError("merge rmm: adapters with modules_to_save are not supported")
        return lowrank, dense, "lora", adapters[0]
    for t in ctx.progress([t for t, k in plan.items() if k == "merge"], description="pt-svd"):
        b = inputs.base.value(t).float()
        deltas = [g.value(t).float() - b for g in inputs.graphs]
        if all(not bool(d.any()) for d in deltas):
            continue
        if b.dim() == 2:
            lowrank[t] = ("linear", [pt_svd(d, params.rank, device=ctx.device) for d in deltas], False)
        else:
            dense[t] = deltas
    return lowrank, dense, "pt-svd", None


@register("merge.rmm", RmmParams, multi_model=True,
          summary="Reversible merging of low-rank weights (arXiv 2510.14163).")
def merge_rmm(graph: Graph, params: RmmParams, ctx: Context) -> Graph:
    """Reversible merge: per-position basis + per-task coefficients; revert any task later."""
    op = "merge rmm"
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=2, op=op)
    n = inputs.n
    if params.p >= n:
        raise SurgeonError(f"{op}: basis size p={params.p} must be smaller than the number of models n={n} "
                           "(p ≥ n stores more than the inputs)")
    plan = check_compatible(inputs, params, op=op)
    lowrank, dense, source, adapter = _task_factors(inputs, plan, params, ctx)
    if not lowrank:
        raise SurgeonError(f"{op}: the models do not differ from the base in any 2-D weight")
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    kept = dropped = 0.0
    stored = original = 0
    err_num = [0.0] * n
    err_den = [0.0] * n
    for t, (kind, facs, transposed) in ctx.progress(list(lowrank.items()), description="rmm"):
        r = facs[0][0].shape[0]
        if params.p > r:
            raise SurgeonError(f"{op}: basis size p={params.p} exceeds the rank r={r} of {t!r}")
        xb = torch.stack([b for _a, b in facs], -1)  # [d_out, r, n]: rows of B
        xa = torch.stack([a.T for a, _b in facs], -1)  # [d_in, r, n]: columns of A
        info: dict[str, Any] = {"kind": kind, "transposed": transposed, "r": r, "coefficients": params.coefficients}
        rebuilt: dict[str, torch.Tensor] = {}
        for side, x in (("B", xb), ("A", xa)):
            if params.coefficients == "tensor":  # one position holding the whole flattened factor
                x = x.reshape(1, -1, n)
            basis, coeffs, mean, sq = rmm_fit(x, params.p, center=params.center, device=ctx.device)
            out[f"{t}::{side}.basis"] = basis
            out[f"{t}::{side}.coeffs"] = coeffs
            if mean is not None:
                out[f"{t}::{side}.mean"] = mean
            kept += float(sq[:, : params.p].sum())
            dropped += float(sq[:, params.p :].sum())
            stored += basis.numel() + coeffs.numel() + (mean.numel() if mean is not None else 0)
            original += x.numel()
            shape = (xb if side == "B" else xa).shape[:2]
            rebuilt[side] = torch.stack([rmm_revert(basis, coeffs, mean, i).reshape(shape) for i in range(n)], 0)
        for i, (a, b) in enumerate(facs):
            num, den = lowrank_rel_error(b, a, rebuilt["B"][i], rebuilt["A"][i].T)
            err_num[i] += num
            err_den[i] += den
        info["shape"] = [xb.shape[0], xa.shape[0]]
        modules[t] = info
    for t, deltas in dense.items():
        for i, d in enumerate(deltas):
            out[f"{t}::delta.{i}"] = d.contiguous()
    tasks = list(inputs.names)
    rel = [math.sqrt(a / b) if b > 0 else 0.0 for a, b in zip(err_num, err_den)]
    energy = kept / (kept + dropped) if kept + dropped > 0 else 1.0
    meta = {
        "method": "rmm", "paper": "arXiv 2510.14163", "tasks": tasks, "task_folders": [Path(x).name for x in tasks],
        "n": n, "p": params.p, "center": params.center, "coefficients": params.coefficients, "source": source,
        "r": sorted({m["r"] for m in modules.values()}), "base": inputs.base_name,
        "retained_energy": energy, "storage_ratio": stored / original if original else 1.0,
        "relative_error": dict(zip(tasks, rel)), "modules": modules, "dense_deltas": sorted(dense),
        "adapter_config": dict(adapter.config) if adapter is not None else None,
    }
    g = Graph({k: Const(v, label="rmm") for k, v in out.items()}, configs={}, weight_stems={"": RMM_STEM},
              sources=list(inputs.base.sources), base_model=inputs.base.base_model)
    ctx.attach(g, RMM_JSON, json.dumps(meta, indent=1) + "\n")
    g.tags = ["merge", "rmm"]
    ctx.report(method="rmm", tasks=tasks, p=params.p, r=meta["r"], retained_energy=energy,
               storage_ratio=meta["storage_ratio"], relative_error=meta["relative_error"])
    ctx.log(f"rmm: {len(modules)} tensors, retained energy {energy:.4f}, storage {meta['storage_ratio']:.3f}× "
            f"of the {n} low-rank inputs")
    return g
