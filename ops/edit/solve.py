"""Closed forms of the edit (ALGORITHMS.md §4.3), in ``nn.Linear`` orientation: W ∈ ℝ^{d_out×d_k}, keys are
columns. Pure tensor functions, fp64 by default, every solve through :mod:`surgeon.kernels.linalg`.

- r-ROME (Meng et al. 2022, eq. 2; Gupta et al. 2024 arXiv 2403.07175): u = C⁻¹k, ΔW = (v* − Wk) uᵀ / (uᵀk),
  so Ŵk = v* exactly, with the smallest change in the C-metric. One averaged key k is used for the direction,
  the residual and the denominator.
- EMMET (Gupta et al. 2024, arXiv 2403.14236): R = V − WK, ΔW = R (KᵀC⁻¹K + λ′I)⁻¹ KᵀC⁻¹. λ′ = 0 is the
  equality-constrained solution (ŴK = V); n = 1, λ′ = 0 is r-ROME. As in the authors' ``emmet_main.py`` the
  ridge is added only for batches of more than one key. R = V − WK is the paper's residual; the code's is δ
  (``residual="delta"``: v* − v₀ with v₀ the plain prompt's output).
- MEMIT's per-layer step (Meng et al. 2023, ``memit_main.py``) is the same factored solve with the residual
  given: ΔW_l = R_l K_lᵀ(λC_l + K_lK_lᵀ)⁻¹ = R_l (K_lᵀC_l⁻¹K_l + λI)⁻¹ K_lᵀC_l⁻¹ (:func:`ridge_factors`).
- MEMIT (Meng et al. 2023, eq. 14, one layer): ΔW = R Kᵀ (λ′C + KKᵀ)⁻¹, the same matrix as EMMET by the
  push-through identity; kept here as the test oracle for large λ′.

Every update is returned as factors ``(up, down)`` with ΔW = up @ down (rank = number of keys), so the graph
stores a low-rank node rather than a dense copy.
"""
from __future__ import annotations

import torch
from surgeon.kernels import linalg
from surgeon.kernels.covariance import CholeskyFactor

FP64 = torch.float64


def rome_update(weight: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cov: CholeskyFactor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """r-ROME rank-one update: ``(up [d_out, 1], down [1, d_k])`` with (W + up@down) k + b = value exactly.

    ``weight`` is [d_out, d_k] (Linear orientation), ``key`` [d_k] the averaged key, ``value`` [d_out] = v*.
    """
    w = weight.to(device=cov.device, dtype=FP64)
    k = key.to(device=cov.device, dtype=FP64)
    v = value.to(device=cov.device, dtype=FP64)
    u = cov.solve(k)  # C⁻¹k: the direction that least disturbs other keys
    denom = u @ k
    if not torch.isfinite(denom) or float(denom) <= 0:
        raise ValueError(f"kᵀC⁻¹k = {float(denom):.3g}: the key has no component the covariance can move")
    residual = v - w @ k - (bias.to(device=cov.device, dtype=FP64) if bias is not None else 0)
    return (residual / denom)[:, None].cpu(), u[None, :].cpu()


def ridge_factors(residual: torch.Tensor, keys: torch.Tensor, cov: CholeskyFactor, lam: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [d_out, n], down [n, d_k])`` with up @ down = R (KᵀC⁻¹K + λI)⁻¹ KᵀC⁻¹ = R Kᵀ(λC + KKᵀ)⁻¹ (fp64).

    ``residual`` [d_out, n] and ``keys`` [d_k, n] are columns; the only solves are one with C (cached
    Cholesky factor) and one n×n."""
    k = keys.to(device=cov.device, dtype=FP64)
    r = residual.to(device=cov.device, dtype=FP64)
    cinv_k = cov.solve(k)  # [d_k, n]
    gram = k.T @ cinv_k  # KᵀC⁻¹K, n×n
    gram = 0.5 * (gram + gram.T) + lam * torch.eye(gram.shape[0], device=gram.device, dtype=FP64)
    # R·A⁻¹ = (A⁻¹ Rᵀ)ᵀ with A symmetric positive definite (n×n: cheap).
    up = linalg.cholesky_solve(gram, r.T, device=cov.device, keep_device=True).T
    return up.cpu(), cinv_k.T.cpu()


def emmet_update(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cov: CholeskyFactor,
                 lam: float, bias: torch.Tensor | None = None, *, initial: torch.Tensor | None = None,
                 ridge_single: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET batched update: ``(up [d_out, n], down [n, d_k])``, ΔW = R (KᵀC⁻¹K + λ′I)⁻¹ KᵀC⁻¹.

    ``keys`` [d_k, n] and ``values`` [d_out, n] are columns (one per edit). With ``lam = 0`` the edited layer
    maps every key exactly to its value; a larger λ′ trades exactness for a smaller update (MEMIT's regime).
    λ′ is added only when n > 1 (the authors' code; ``ridge_single`` adds it for one key too).
    R = V − WK − b (the paper), or V − ``initial`` (= δ, the authors' code) when ``initial`` is given.
    """
    w = weight.to(device=cov.device, dtype=FP64)
    k = keys.to(device=cov.device, dtype=FP64)
    v = values.to(device=cov.device, dtype=FP64)
    if initial is not None:
        residual = v - initial.to(device=cov.device, dtype=FP64)
    else:
        residual = v - w @ k
        if bias is not None:
            residual = residual - bias.to(device=cov.device, dtype=FP64)[:, None]
    ridge = lam if (k.shape[1] > 1 or ridge_single) else 0.0
    return ridge_factors(residual, k, cov, ridge)
