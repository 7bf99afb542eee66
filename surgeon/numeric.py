"""Numeric checks shared by the reader, the executor and ops (no file or format knowledge here)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch


def check_finite(name: str, t: torch.Tensor, hint: str = "pass --allow-nonfinite to accept it") -> None:
    """NaN/Inf refusal. A sum propagates both and is ~20x faster than ``isfinite(t).all()``; only when the sum
    is not finite (possibly an overflow of finite values) does the exact check run."""
    import torch

    if not t.dtype.is_floating_point or not t.numel():
        return
    if t.element_size() == 1:  # float8: no reduction kernels
        t = t.float()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return
    if not bool(torch.isfinite(t).all()):
        raise SurgeonError(f"tensor {name!r} contains NaN or Inf ({hint})")
