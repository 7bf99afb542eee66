"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", arXiv 2301.00774; ``IST-DASLab/sparsegpt``).

Per linear layer with calibration inputs X, the layer-wise problem min ‖WX − ŴX‖² has Hessian H = 2XᵀX/n
(eq. 1). Columns are processed left to right; pruning or keeping column j is followed by the optimal update of
the columns not yet processed, δ = −(w_j − ŵ_j)/[H_F⁻¹]_jj · [H_F⁻¹]_j,F (eq. 3), where F are the remaining
columns. All the [H_F⁻¹] rows needed are the rows of the upper Cholesky factor U of H⁻¹ (U[j, j:] equals
[H_F⁻¹]_j,F / sqrt([H_F⁻¹]_jj) with F = {j, …}), so the whole pass costs one Cholesky (Algorithm 1). Updates
within a column block of ``blocksize`` are applied eagerly, to later blocks lazily once per block.
The mask of a column block is chosen at its start by the OBS saliency w²/[H_F⁻¹]_jj = w²/U_jj² (§3.3, adaptive
mask selection); N:M masks are chosen every M columns on the current weights.

Differences from the reference code (documented in docs/prune.md): the reference prunes ⌊s·numel⌋ + 1 entries
per column block (``tmp <= sorted[k]``), here each block prunes its share of exactly ⌊s·numel⌋ for the whole
matrix (ties: lower flat index first); inverses and the Cholesky factor are computed in fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.errors import SurgeonError


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
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                mask1[:, i:i + nm[1]] = nm_group_mask(w1[:, i:i + nm[1]], d1[i:i + nm[1]], nm[0])
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0)
            e = (col - q) / d1[i]
            error += (e.double() ** 2).sum() / 2
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w.masked_fill_(mask, 0)
    return SparseGPTResult(w, mask, float(error))
