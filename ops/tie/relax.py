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


def whitening_factor(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor L of the damped input Gram matrix C = Σ_t x_t x_tᵀ + λ·mean(diag C)·I (fp64), so
    that ‖M X‖_F² = ‖M L‖_F² for any M when λ = 0. Damping keeps L invertible when the calibration tokens do not
    span the input space (fewer tokens than inputs, dead channels)."""
    import torch

    c = gram.double()
    scale = float(c.diagonal().mean())
    c = c + (damp * scale if scale > 0 else 1.0) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:  # damping a PSD matrix makes it PD; this only trips on NaN/Inf statistics
        from surgeon.errors import SurgeonError

        raise SurgeonError("tie: the calibration Gram matrix is not positive definite (non-finite activations?)")
    return chol


def relax_residual_whitened(residual: torch.Tensor, gram: torch.Tensor, rank: int, *, damp: float = 0.01,
                            device: str = "cpu") -> Relaxation:
    """Activation-aware truncated SVD: the rank-r B A minimising the *output* error ‖(R − BA) X‖_F on calibration
    inputs X (Gram C = X Xᵀ = L Lᵀ), not the weight error ‖R − BA‖_F of the paper's plain SVD.

    ‖(R − BA)X‖ = ‖(R − BA)L‖, so by Eckart–Young the optimum is the truncated SVD of R L = U Σ Vᵀ mapped back:
    B A = U_rΣ_r V_rᵀ L⁻¹ (the whitening of SVD-LLM, Wang et al. 2024, arXiv 2403.07378, Eq. 3-5, applied to the
    tying residual). At full rank B A = R exactly. Gauge: A's rows are scaled to unit norm (as V_rᵀ's are in the
    plain init) and B absorbs the scale. ``error`` is the output error √Σ_{i>r}σ_i²(R L) (with the damped C) and
    ``retained_energy`` the kept share of ‖R L‖²."""
    import torch

    with _lapack_threads(1 if device == "cpu" else None):
        r = max(0, min(rank, *residual.shape))
        dev = torch.device(device)
        chol = whitening_factor(gram.to(dev), damp)
        u, s, vh = torch.linalg.svd(residual.to(dev).double() @ chol, full_matrices=False)
        down = torch.linalg.solve_triangular(chol, vh[:r], upper=False, left=False)  # V_rᵀ L⁻¹
        norms = torch.linalg.vector_norm(down, dim=1).clamp_min(1e-30)
        up = u[:, :r] * (s[:r] * norms)
        down = down / norms[:, None]
        total = float(s.pow(2).sum())
        kept = float(s[:r].pow(2).sum())
        return Relaxation(up=up.float().cpu(), down=down.float().cpu(), residual_norm=total ** 0.5,
                          retained_energy=min(kept / total, 1.0) if total > 0 else 1.0,
                          error=float(s[r:].pow(2).sum().sqrt()))
