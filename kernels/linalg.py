"""Dense linear algebra on the chosen device, accumulating in fp32/fp64 as asked.

Every function takes ``device`` (``"cpu"``, ``"cuda"``, ...); inputs may live anywhere and results come back on
the CPU unless ``keep_device`` is set, so callers can stream tensors through a GPU one at a time.
"""
from __future__ import annotations

import torch


def _to(x: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device=device, dtype=dtype, non_blocking=True)


def svd(a: torch.Tensor, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
        keep_device: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(S) Vh``."""
    u, s, vh = torch.linalg.svd(_to(a, device, dtype), full_matrices=False)
    if keep_device:
        return u, s, vh
    return u.cpu(), s.cpu(), vh.cpu()


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 10, n_iter: int = 4, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0,
                   keep_device: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD by randomized range finding with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    Falls back to the exact SVD when ``rank + oversample`` reaches the smaller dimension.
    """
    m, n = a.shape
    k = min(rank + oversample, m, n)
    if k >= min(m, n) or rank <= 0:
        u, s, vh = svd(a, device=device, dtype=dtype, keep_device=True)
        r = max(0, min(rank, s.numel()))
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        x = _to(a, device, dtype)
        g = torch.Generator(device=x.device).manual_seed(seed)
        omega = torch.randn(n, k, generator=g, device=x.device, dtype=dtype)
        q, _ = torch.linalg.qr(x @ omega)
        for _ in range(n_iter):
            q, _ = torch.linalg.qr(x.T @ q)
            q, _ = torch.linalg.qr(x @ q)
        ub, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
        u = q @ ub
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if keep_device:
        return u, s, vh
    return u.cpu(), s.cpu(), vh.cpu()


def cholesky_solve(a: torch.Tensor, b: torch.Tensor, *, device: str = "cpu", dtype: torch.dtype = torch.float64,
                   jitter: float = 0.0, keep_device: bool = False) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive definite ``a`` (``jitter·mean(diag)·I`` added when > 0)."""
    a = _to(a, device, dtype)
    if jitter > 0:
        a = a + jitter * a.diagonal().mean() * torch.eye(a.shape[0], device=a.device, dtype=dtype)
    l, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"matrix is not positive definite (leading minor {int(info)})")
    x = torch.cholesky_solve(_to(b, device, dtype), l)
    return x if keep_device else x.cpu()


def solve(a: torch.Tensor, b: torch.Tensor, *, device: str = "cpu", dtype: torch.dtype = torch.float64,
          keep_device: bool = False) -> torch.Tensor:
    """General dense solve ``a x = b``."""
    x = torch.linalg.solve(_to(a, device, dtype), _to(b, device, dtype))
    return x if keep_device else x.cpu()


class CovarianceAccumulator:
    """Streams ``E[x xᵀ]`` over row batches ``x: [n, d]`` in ``dtype`` on ``device`` (holds only d×d)."""

    def __init__(self, dim: int, *, device: str = "cpu", dtype: torch.dtype = torch.float64):
        self.sum = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.count = 0
        self.device, self.dtype = device, dtype

    def update(self, x: torch.Tensor) -> None:
        x = _to(x.reshape(-1, x.shape[-1]), self.device, self.dtype)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no samples accumulated")
        return (self.sum / self.count).cpu()
