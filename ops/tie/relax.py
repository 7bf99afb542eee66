"""Relaxation of a tied layer: the truncated SVD of what tying removed, R = W_ℓ − W′ ≈ B A (Bae et al., arXiv
2410.20672, Sec. 3.3)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Relaxation:
    """``R ≈ B A`` with ``B = U_r Σ_r`` [out, r], ``A = V_rᵀ`` [r, in] and the energy bookkeeping of Sec. 3.3."""

    up: torch.Tensor
    down: torch.Tensor
    residual_norm: float
    retained_energy: float  # Σ_{i≤r} σ_i² / Σ σ_i²
    error: float  # ‖R − BA‖_F = √Σ_{i>r} σ_i²


def relax_residual(residual: torch.Tensor, rank: int, *, method: str = "auto", device: str = "cpu",
                   seed: int = 0) -> Relaxation:
    """Truncated SVD of the tying residual R = W_ℓ − W′ (fp32). ``rank`` is capped at min(out, in).

    The error is ‖R − BA‖_F: the dropped singular energy √Σ_{i>r}σ_i² for the exact SVD (Eckart–Young), measured
    directly for the randomized one.
    """
    from surgeon.kernels.linalg import randomized_svd, svd

    with _lapack_threads(1 if device == "cpu" else None):
        return _relax(residual, rank, method, device, seed, randomized_svd, svd)


@contextlib.contextmanager
def _lapack_threads(n: int | None) -> Iterator[None]:
    """Run LAPACK single-threaded on CPU: MKL's threaded gesdd on matrices of a few hundred rows is slower than one
    thread on a busy machine (measured 0.43 s vs 1.07 s for 1536×576 with 2 threads under load, 0.003 s vs
    0.58 s for 128×64), and residual SVDs are many small independent problems."""
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _relax(residual, rank, method, device, seed, randomized_svd, svd) -> Relaxation:
    r = max(0, min(rank, *residual.shape))
    import torch

    total = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2
    if method == "randomized" or (method == "auto" and 3 * (r + 10) < min(residual.shape)):
        u, s, vh = randomized_svd(residual, r, device=device, seed=seed)
        up = u * s
        dropped = total - float(s.double().pow(2).sum())
        if dropped > 1e-4 * total:  # U_r orthonormal and Σ_rV_rᵀ = U_rᵀR: ‖R − BA‖² = ‖R‖² − Σσ_r²
            error = max(dropped, 0.0) ** 0.5
        else:  # ... which cancels in fp32 when little is dropped: measure the remainder instead
            error = float(torch.linalg.vector_norm(residual.to(up.device) - up @ vh, dtype=torch.float64))
    else:
        u, s_all, vh = svd(residual, device=device)
        s, u, vh = s_all[:r], u[:, :r], vh[:r]
        up = u * s
        error = float(s_all[r:].double().pow(2).sum().sqrt())
    kept = float(s.double().pow(2).sum())
    return Relaxation(up=up, down=vh, residual_norm=total ** 0.5,
                      retained_energy=min(kept / total, 1.0) if total > 0 else 1.0, error=error)
