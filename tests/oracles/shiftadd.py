"""Reference computations for the ShiftAdd kernels (test oracles, not used by surgeon itself)."""
from __future__ import annotations

import torch
from surgeon.kernels.shiftadd_cpu import dequantize


def lut_gemv_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                       group_size: int) -> torch.Tensor:
    """Plain-torch reference: ``x @ dequantize(...)ᵀ`` in fp64 (``x``: [M, K])."""
    w = dequantize(qweight, scales, in_features, group_size).double()
    return (x.double() @ w.T).float()
