"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", arXiv 2301.00774; ``IST-DASLab/sparsegpt``).

Per linear layer with calibration inputs X, the layer-wise problem min ‖WX − ŴX‖² has Hessian H = 2XᵀX/n
(eq. 1). Columns are processed left to right; pruning or keeping column j is followed by the optimal update of
the columns not yet processed, δ = −(w_j − ŵ_j)/[H_F⁻¹]_jj · [H_F⁻¹]_j,F (eq. 3), where F are the remaining
columns. All the [H_F⁻¹] rows needed are the rows of the upper Cholesky factor U of H⁻¹ (U[j, j:] equals
[H_F⁻¹]_j,F / sqrt([H_F⁻¹]_jj) with F = {j, …}), so the whole pass costs one Cholesky (Algorithm 1). Updates
within a column block of ``blocksize`` are applied eagerly, to later blocks lazily once per block.
The mask of a column block is chosen at its start by the OBS saliency w²/[H_F⁻¹]_jj = w²/U_jj² (§3.3, adaptive
mask selection); N:M masks are chosen every M columns on the current weights. Calibration runs block by block
on the model engine (:mod:`surgeon.engine`), sequentially: block l's Hessians are measured on the outputs of the
already pruned blocks < l.

Differences from the reference code (documented in docs/prune.md): the reference prunes ⌊s·numel⌋ + 1 entries
per column block (``tmp <= sorted[k]``), here each block prunes its share of exactly ⌊s·numel⌋ for the whole
matrix (ties: lower flat index first); inverses and the Cholesky factor are computed in fp64.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from surgeon import engine
from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.registry import register

from .common import (
    CalibratedPruneParams,
    Pruned,
    check_nm_shapes,
    parse_nm,
    prune_targets,
    sparsity_facts,
    transposed_names,
)


class Params(CalibratedPruneParams):
    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of each matrix's weights set to zero (exact).")
    blocksize: int = Field(128, ge=1, description="Columns per block: the mask is chosen per block and updates to "
                           "later blocks are batched (the reference's 128).")
    percdamp: float = Field(0.01, gt=0, le=1, description="Damping added to the Hessian's diagonal, as a fraction "
                            "of its mean.")

    @model_validator(mode="after")
    def _blocksize_fits_m(self) -> Params:
        nm = parse_nm(self.nm)
        if nm is not None and self.blocksize % nm[1]:
            raise ValueError(f"blocksize {self.blocksize} is not a multiple of M={nm[1]}")
        return self


@dataclass
class SparseGPTResult:
    """Pruned weights ``[out, in]`` (exact zeros where ``mask``), the mask (True = pruned) and the OBS error
    Σ (w − ŵ)²/U_jj² / 2, the layer-wise loss increase the algorithm predicts (reference ``Losses``)."""

    weight: torch.Tensor
    mask: torch.Tensor
    error: float


def hessian(xtx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """H = 2·XᵀX / n from the accumulated Σ x xᵀ over ``n_tokens`` input rows (eq. 1)."""
    if n_tokens <= 0:
        raise SurgeonError("sparsegpt: no calibration tokens reached this layer")
    return xtx.double() * (2.0 / n_tokens)


def inverse_cholesky(h: torch.Tensor, percdamp: float, *, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper triangular with UᵀU = (H + λI)⁻¹, λ = ``percdamp``·mean(diag H), after the dead inputs
    (diag H = 0: the input is always zero) get H_jj = 1 so H stays invertible. fp64."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    try:
        lower = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(lower)
        upper = torch.linalg.cholesky(hinv, upper=True)
    except RuntimeError:
        raise SurgeonError(f"sparsegpt: {name}: the calibration Hessian is not positive definite even with "
                           f"percdamp={percdamp}; raise --percdamp or use more calibration data") from None
    return upper, dead


def block_prune_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """Entries each column block prunes so that the whole matrix loses exactly ⌊s·rows·cols⌋: block
    [i1, i2) takes ⌊s·rows·i2⌋ − ⌊s·rows·i1⌋."""
    def upto(c: int) -> int:
        return math.floor(sparsity * rows * c + 1e-9)

    return [upto(min(i1 + blocksize, cols)) - upto(i1) for i1 in range(0, cols, blocksize)]


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` smallest entries of ``score`` (ties: lower flat index first)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.sort(score.reshape(-1), stable=True).indices[:k]] = True
    return mask.reshape(score.shape)


def nm_group_mask(w: torch.Tensor, u_diag: torch.Tensor, n: int) -> torch.Tensor:
    """For one group of M columns ``w [rows, M]``: True at the M − N lowest OBS saliencies w²/U_jj² per row."""
    score = w.pow(2) / u_diag.pow(2)[None, :]
    m = w.shape[1]
    idx = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


@contextmanager
def cpu_single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the column loop on CPU: its operations are small (rows × blocksize), and thread
    synchronisation made them ~20× slower on a shared 2-core machine (576×576: 11 s with 2 threads, 0.6 s with 1)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, name: str = "layer") -> SparseGPTResult:
    """Prune ``w [out, in]`` (Linear orientation) with Hessian ``h [in, in]`` (Algorithm 1 of the paper).

    Computes in ``w``'s dtype (pass fp32 or fp64); the Cholesky factor comes from fp64. Dead inputs' weights
    are set to zero first (they never reach the output), as the reference does."""
    if nm is not None and blocksize % nm[1]:
        raise SurgeonError(f"sparsegpt: blocksize {blocksize} is not a multiple of M={nm[1]}")
    rows, cols = w.shape
    if tuple(h.shape) != (cols, cols):
        raise SurgeonError(f"sparsegpt: {name}: Hessian shape {list(h.shape)} does not match {cols} inputs")
    upper, dead = inverse_cholesky(h, percdamp, name=name)
    dt = w.dtype
    u = upper.to(device=w.device, dtype=dt)
    w = w.clone()
    w[:, dead.to(w.device)] = 0
    mask = torch.zeros_like(w, dtype=torch.bool)
    error = torch.zeros((), dtype=torch.float64)
    counts = None if nm is not None else block_prune_counts(rows, cols, sparsity, blocksize)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        if counts is not None:
            mask1 = lowest_k_mask(w1.pow(2) / d1.pow(2)[None, :], counts[b])
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        pruned_f = mask1.to(dt)  # 1 where pruned: the column's error is w_j·1/U_jj there, 0 elsewhere
        with cpu_single_thread(w.device):
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    mask1[:, i:i + nm[1]] = nm_group_mask(w1[:, i:i + nm[1]], d1[i:i + nm[1]], nm[0])
                    pruned_f[:, i:i + nm[1]] = mask1[:, i:i + nm[1]]
                e = w1[:, i] * pruned_f[:, i] / d1[i]
                w1[:, i:].addr_(e, u1[i, i:], alpha=-1)  # column i becomes its pruned value (zeroed below)
                err1[:, i] = e
        error += (err1.double() ** 2).sum() / 2
        w1.masked_fill_(mask1, 0)
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w.masked_fill_(mask, 0)
    return SparseGPTResult(w, mask, float(error))


# --- calibration wiring (the model engine) --------------------------------------------------------------------------

def prune_weight(w: torch.Tensor, xtx: torch.Tensor, n_tokens: int, params: Params, *, transposed: bool,
                 name: str) -> SparseGPTResult:
    """SparseGPT on a stored weight (Conv1D ``[in, out]`` is transposed to Linear orientation and back), fp32."""
    wf = w.detach().float()
    wf = wf.T if transposed else wf
    res = sparsegpt_prune(wf, hessian(xtx, n_tokens).to(wf.device), sparsity=params.sparsity,
                          nm=parse_nm(params.nm), blocksize=params.blocksize, percdamp=params.percdamp, name=name)
    if transposed:
        res = SparseGPTResult(res.weight.T.contiguous(), res.mask.T.contiguous(), res.error)
    return res


def _pruned_value(new: torch.Tensor) -> torch.Tensor:
    return new


@register("prune.sparsegpt", Params, model_level=True,
          summary="SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh 2023).")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """SparseGPT pruning: OBS weight updates from calibration Hessians."""
    names = prune_targets(graph, params.include, params.exclude, params.arch, ctx=ctx)
    nm = parse_nm(params.nm)
    trans = transposed_names(graph, names, params.arch, ctx=ctx)
    if nm is not None:
        check_nm_shapes(graph, names, nm[1], trans)
    r = ctx.roles(graph, overrides=params.arch)
    prefixes = [r.layer_prefix(i) for i in range(r.n_layers)]
    by_layer: list[list[str]] = [[] for _ in prefixes]
    for n in names:
        i = next((i for i, p in enumerate(prefixes) if n.startswith(p)), None)
        if i is None:
            raise SurgeonError(f"prune.sparsegpt: {n!r} is not inside a decoder block (SparseGPT prunes block "
                               "linears; use prune.magnitude for embeddings or lm_head)")
        by_layer[i].append(n)
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.n_windows)
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=params.batch_size, roles=r)
    per_tensor: dict[str, tuple[int, int]] = {}
    errors: dict[str, float] = {}

    def change(block, stats) -> None:
        # every linear of the block from the unpruned block's inputs (the reference's default order)
        for n in by_layer[block.index]:
            st = stats[n]
            res = prune_weight(block.param(n), st.xtx, st.count, params, transposed=n in trans, name=n)
            block.set(n, res.weight)
            per_tensor[n] = (int(res.mask.sum()), res.mask.numel())
            errors[n] = res.error

    with ctx.timed("calibrate"):
        eng.run(tokens, observe={n: ("xtx",) for n in names}, change=change,
                layers=[i for i, ns in enumerate(by_layer) if ns], transposed=trans, progress=ctx.progress)
    ctx.report(**eng.timing())
    out = graph.copy()
    for n in per_tensor:
        dense = graph[n]
        out.replace(n, Pruned(_pruned_value, [eng.changed[n]], dense=dense, label="prune-sparsegpt"))
    del eng
    ctx.report(method="sparsegpt", nm=params.nm, blocksize=params.blocksize, percdamp=params.percdamp,
               calibration_windows=int(tokens.shape[0]), calibration_seqlen=int(tokens.shape[1]),
               obs_error=round(sum(errors.values()), 6), **sparsity_facts(per_tensor))
    return out
