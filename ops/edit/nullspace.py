"""AlphaEdit's math (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing", arXiv 2410.02355):
the null-space projector of the preserved keys and the projected update. Pure tensor functions, fp64, in
``nn.Linear`` orientation (W ∈ ℝ^{d_out×d_k}, keys are columns).

- Projector (paper §3.2, Eq. 8–9): K₀K₀ᵀ = UΛUᵀ (here C = E[kkᵀ] per token, the statistics the other edits use);
  Û = the eigenvectors whose eigenvalue is below ``threshold`` (the reference's ``nullspace_threshold``, 2e-2,
  absolute, on the per-token moment); P = ÛÛᵀ, so P K₀ ≈ 0: a perturbation ΔP leaves the preserved keys'
  outputs (W + ΔP)K₀ ≈ WK₀ unchanged.
- Update (paper Eq. 14, transposed to the Linear orientation): with R the residual of the batch's keys K₁, K_p the
  keys of earlier batches, α the L2 weight,
  ΔW = R K₁ᵀ P (K_pK_pᵀP + K₁K₁ᵀP + αI)⁻¹, i.e. Δᵀ = (P(K₁K₁ᵀ + K_pK_pᵀ) + αI)⁻¹ P K₁ Rᵀ as the authors'
  code solves it. Returned as factors ``(up, down)`` = (R, ((P(K₁K₁ᵀ + K_pK_pᵀ) + αI)⁻¹ P K₁)ᵀ), rank n.
"""
from __future__ import annotations

import torch

FP64 = torch.float64


def nullspace_basis(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Û [d_k, m], eigenvalues [d_k] ascending) of the symmetric PSD ``mom2``: Û spans the eigenvectors whose
    eigenvalue is below ``threshold`` (the reference takes the SVD; for a symmetric PSD matrix it is the same)."""
    c = mom2.to(FP64)
    vals, vecs = torch.linalg.eigh(0.5 * (c + c.T))
    return vecs[:, vals < threshold].contiguous(), vals


def projector(basis: torch.Tensor) -> torch.Tensor:
    """P = ÛÛᵀ [d_k, d_k] (fp64): the orthogonal projector onto the preserved keys' null space."""
    b = basis.to(FP64)
    return b @ b.T


def projected_update(residual: torch.Tensor, keys: torch.Tensor, proj: torch.Tensor, previous: torch.Tensor,
                     l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update (Eq. 14) as ``(up [d_out, n], down [n, d_k])``, ΔW = up @ down (fp64, CPU).

    ``residual`` [d_out, n] and ``keys`` [d_k, n] are columns; ``proj`` the projector P; ``previous`` = K_pK_pᵀ,
    the summed outer products of earlier batches' keys (zeros for the first batch); ``l2`` α."""
    p = proj.to(FP64)
    k = keys.to(device=p.device, dtype=FP64)
    r = residual.to(device=p.device, dtype=FP64)
    a = p @ (k @ k.T + previous.to(device=p.device, dtype=FP64))
    a.diagonal().add_(l2)
    down = torch.linalg.solve(a, p @ k).T  # [n, d_k]
    return r.cpu(), down.cpu()
