"""Second-moment matrices and their cached Cholesky factor, on the chosen device.

:class:`CholeskyFactor` factors a symmetric positive (semi-)definite C once in fp64 and then answers C⁻¹X
solves; when C is singular (fewer distinct samples than dimensions) it adds ``eps·mean(diag C)·I``,
multiplying eps by 10 until the factorisation succeeds, and records how much it added.
Accumulation of C itself is :class:`surgeon.kernels.linalg.CovarianceAccumulator`.
"""
from __future__ import annotations

import torch

FP64 = torch.float64


class CholeskyFactor:
    """``C = L Lᵀ`` computed once; :meth:`solve` gives C⁻¹x for vectors or column blocks."""

    def __init__(self, matrix: torch.Tensor, *, device: str = "cpu", eps: float = 1e-6, max_eps: float = 1.0):
        c = matrix.to(device=device, dtype=FP64)
        c = torch.add(c, c.mT).mul_(0.5)  # symmetric; one new matrix, the caller's is never changed
        self.dim = c.shape[0]
        self.device = device
        self.jitter = 0.0  # relative εI actually added (0: C was positive definite)
        lower, info = torch.linalg.cholesky_ex(c)
        if int(info) != 0:
            # retry with growing εI added to the diagonal in place: memory stays C + its factor (a d = 14336
            # covariance is 1.6 GB in fp64, so copies of it per retry are what bounds memory)
            scale = float(c.diagonal().mean()) or 1.0
            jitter, added = eps, 0.0
            while int(info) != 0:
                if jitter > max_eps:
                    raise ValueError(f"matrix is not positive semi-definite (Cholesky fails with εI, ε={max_eps})")
                del lower
                c.diagonal().add_((jitter - added) * scale)
                added = jitter
                lower, info = torch.linalg.cholesky_ex(c)
                self.jitter = jitter
                jitter *= 10
        del c
        self.lower = lower

    @classmethod
    def identity(cls, dim: int, *, device: str = "cpu") -> CholeskyFactor:
        return cls(torch.eye(dim, dtype=FP64), device=device)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """C⁻¹x (fp64, on this factor's device) for x of shape [d] or [d, n]."""
        vec = x.dim() == 1
        x = x.to(device=self.device, dtype=FP64)
        out = torch.cholesky_solve(x[:, None] if vec else x, self.lower)
        return out[:, 0] if vec else out
