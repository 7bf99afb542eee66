"""ShiftAdd matmul dispatch: one packed linear, ``y = x @ Ŵᵀ``, on the device and kernel that fit the batch.

- batch (rows of x) ≤ ``max_lut_batch`` (default 8): LUT GEMV — on CPU the C/AVX2 kernel (``c-avx2-lut``, built
  on first use) or numba (``numba-lut``: no AVX2/compiler, or ``SURGEON_SHIFTADD_KERNEL=numba``); on CUDA Triton;
- larger batches (prefill) or CUDA without triton: dequantise to a dense fp32 (CPU) / fp16-or-fp32 (CUDA) weight and
  call BLAS.

Which kernel ran is kept in :data:`KERNEL_CALLS` (name -> count) and in ``PackedLinear.last_kernel``, so the loader,
the benchmark and the docs can say what was measured.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from surgeon.kernels.shiftadd_cpu import (
    CLutWeights,
    CpuLutWeights,
    c_kernel,
    c_lut_gemv_prepared,
    dequantize,
    lut_gemv_prepared,
    pack_signs,
    unpack_signs,
)

__all__ = ["KERNEL_CALLS", "PackedLinear", "dequantize", "pack_signs", "triton_available", "unpack_signs"]

#: kernel name -> number of calls in this process ("c-avx2-lut", "numba-lut", "triton-lut", "dequant-blas")
KERNEL_CALLS: Counter[str] = Counter()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PackedLinear:
    """A packed linear: ``qweight`` uint8 [q, N, ceil(K/8)], ``scales`` fp32 [q, N, ceil(K/gs)], optional
    ``perm`` (act-order: packed column j is input feature ``perm[j]``)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int
    perm: torch.Tensor | None = None
    last_kernel: str = ""
    _prepared: dict = field(default_factory=dict, repr=False)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def bits(self) -> int:
        return self.qweight.shape[0]

    def dense(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ [N, K] in the original column order (the dense fallback)."""
        w = dequantize(self.qweight.to(device), self.scales.to(device), self.in_features, self.group_size)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm.to(device).long()] = w
            w = out
        return w.to(dtype)

    def _cpu(self) -> CpuLutWeights:
        if "cpu" not in self._prepared:
            self._prepared["cpu"] = CpuLutWeights(self.qweight, self.scales, self.in_features, self.group_size)
        return self._prepared["cpu"]

    def _c(self) -> CLutWeights:
        if "c" not in self._prepared:
            self._prepared["c"] = CLutWeights(self.qweight, self.scales, self.in_features, self.group_size)
        return self._prepared["c"]

    def _cuda(self, device: torch.device):
        key = f"triton:{device}"
        if key not in self._prepared:
            from surgeon.kernels.shiftadd_triton import TritonLutWeights

            self._prepared[key] = TritonLutWeights(self.qweight, self.scales, self.in_features, self.group_size,
                                                   device=device)
        return self._prepared[key]

    def matmul(self, x: torch.Tensor, *, device: str = "auto", max_lut_batch: int = 8) -> torch.Tensor:
        """``x [..., K] @ Ŵᵀ`` -> fp32 [..., N] on ``x``'s device (``device`` = where to compute)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        dev = torch.device(("cuda" if x.is_cuda else "cpu") if device == "auto" else device)
        if self.perm is not None:
            x2 = x2[:, self.perm.to(x2.device).long()]
        m = x2.shape[0]
        if 0 < m <= max_lut_batch and dev.type == "cpu" and c_kernel() is not None:
            y, kernel = c_lut_gemv_prepared(x2, self._c()), "c-avx2-lut"
        elif 0 < m <= max_lut_batch and dev.type == "cpu":
            y, kernel = lut_gemv_prepared(x2, self._cpu()), "numba-lut"
        elif 0 < m <= max_lut_batch and dev.type == "cuda" and triton_available():
            from surgeon.kernels.shiftadd_triton import lut_gemv_prepared as triton_gemv

            y, kernel = triton_gemv(x2, self._cuda(dev)), "triton-lut"
        else:
            key = f"dense:{dev}"
            w = self._prepared.get(key)
            if w is None:  # dequantise per call: the packed weight stays the only resident copy
                w = dequantize(self.qweight.to(dev), self.scales.to(dev), self.in_features, self.group_size)
            y, kernel = x2.to(device=dev, dtype=torch.float32) @ w.T, "dequant-blas"
        self.last_kernel = kernel
        KERNEL_CALLS[kernel] += 1
        return y.to(x.device).reshape(*lead, self.out_features)
