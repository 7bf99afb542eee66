"""Second-moment matrices and their cached Cholesky factor, on the chosen device.

:class:`CholeskyFactor` factors a symmetric positive (semi-)definite C once in fp64 and then answers C⁻¹X
solves; when C is singular (fewer distinct samples than dimensions) it adds ``eps·mean(diag C)·I``,
multiplying eps by 10 until the factorisation succeeds, and records how much it added.
Accumulation of C itself is :class:`surgeon.kernels.linalg.CovarianceAccumulator`.
"""
from __future__ import annotations

import torch

FP64 = torch.float64


def _symmetric_copy(matrix: torch.Tensor, device: str) -> torch.Tensor:
    """(C + Cᵀ)/2 in fp64 on ``device``: a new matrix, ``matrix`` is never changed."""
    c = matrix.to(device=device, dtype=FP64)
    return torch.add(c, c.mT).mul_(0.5)


class CholeskyFactor:
    """``C = L Lᵀ`` computed once; :meth:`solve` gives C⁻¹x for vectors or column blocks."""

    def __init__(self, matrix: torch.Tensor, *, device: str = "cpu", eps: float = 1e-6, max_eps: float = 1.0):
        # One working matrix besides the caller's: the symmetrised copy is factored in place on its column-major
        # view (LAPACK's layout, so torch makes no copy); a d = 14336 covariance is 1.6 GB in fp64. A failed
        # attempt leaves it overwritten, so a retry rebuilds it from ``matrix`` (never changed) with a larger εI.
        self.dim = matrix.shape[0]
        self.device = device
        self.jitter = 0.0  # relative εI actually added (0: C was positive definite)
        scale = 0.0
        jitter = 0.0
        info = torch.zeros((), dtype=torch.int32, device=device)
        while True:
            c = _symmetric_copy(matrix, device)
            if jitter == 0.0:
                scale = float(c.diagonal().mean()) or 1.0
            else:
                c.diagonal().add_(jitter * scale)
            lower = c.mT  # column-major view; C is symmetric, so its lower triangle is C's
            torch.linalg.cholesky_ex(lower, out=(lower, info))
            if int(info) == 0:
                break
            del c, lower
            jitter = eps if jitter == 0.0 else jitter * 10
            if jitter > max_eps:
                raise ValueError(f"matrix is not positive semi-definite (Cholesky fails with εI, ε={max_eps})")
        self.jitter = jitter
        self.lower = lower

    @classmethod
    def identity(cls, dim: int, *, device: str = "cpu") -> CholeskyFactor:
        """C = I (``--no-cov``): nothing is built or factored (a d = 14336 identity took minutes to factor)."""
        factor = cls.__new__(cls)
        factor.dim, factor.device, factor.jitter, factor.lower = dim, device, 0.0, None
        return factor

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """C⁻¹x (fp64, on this factor's device) for x of shape [d] or [d, n]."""
        vec = x.dim() == 1
        x = x.to(device=self.device, dtype=FP64)
        if self.lower is None:  # identity
            return x.clone()
        out = torch.cholesky_solve(x[:, None] if vec else x, self.lower)
        return out[:, 0] if vec else out
