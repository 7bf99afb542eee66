"""The linear merge on raw fp32 storage, without torch, byte-identical to torch's CPU arithmetic.

``linear_merge`` in ``ops/merge/classic.py`` (and mergekit's ``linear``) accumulates ``acc.add_(v, alpha=w)`` from
zeros, then ``acc.div_(Σw)``. On CPU torch computes each accumulation as one fused multiply-add with the weight
rounded to fp32 (a single rounding: numpy's ``acc += w * v`` rounds twice and differs in about 30 % of entries),
and divides by the fp32 divisor with an IEEE division. The C kernel here does the same per element: ``fmaf``
(correctly rounded by definition, a hardware FMA where the CPU has one), then ``/``, compiled without fast-math
and with ``-ffp-contract=off`` so the compiler may not re-associate or fuse anything else.
``tests/test_host_merge.py`` compares bytes with torch on random, tail-length and edge-case inputs.

Work goes in blocks of :data:`BLOCK` elements: each input block is converted to fp32 when it is not fp32 already
(exact widening of bfloat16/float16), so memory holds the output and one block per input beyond the sources.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
from surgeon.kernels.cbuild import compiled_library, cpu_flags
from surgeon.kernels.host_dtypes import CONVERTIBLE, convert

BLOCK = 1 << 20  # elements per kernel call (4 MiB of fp32 per input)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* out[j] = (fma(x[k-1][j], w[k-1], ... fma(x[0][j], w[0], 0))) / divisor  (no division when divide == 0) */
void weighted_sum_f32(const float *const *xs, const float *w, int64_t k, int64_t n, float divisor,
                      int32_t divide, float *out) {
  const int64_t tile = 4096;
  for (int64_t lo = 0; lo < n; lo += tile) {
    const int64_t hi = lo + tile < n ? lo + tile : n;
    for (int64_t j = lo; j < hi; j++) out[j] = 0.0f;
    for (int64_t i = 0; i < k; i++) {
      const float *x = xs[i];
      const float wi = w[i];
      for (int64_t j = lo; j < hi; j++) out[j] = fmaf(x[j], wi, out[j]);
    }
    if (divide)
      for (int64_t j = lo; j < hi; j++) out[j] = out[j] / divisor;
  }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    lib.weighted_sum_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_float, ctypes.c_int32, ctypes.c_void_p]
    lib.weighted_sum_f32.restype = None


def _library() -> ctypes.CDLL | None:
    flags = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math"]
    if {"fma", "avx2"} <= cpu_flags():
        flags += ["-mfma", "-mavx2"]  # fmaf becomes the vector FMA instruction; still one rounding
    return compiled_library("host_merge", _SOURCE, flags, _declare)


def available(dtypes: Sequence[str]) -> bool:
    """True when the kernel is built and every input dtype can be widened to fp32 here."""
    return all(d in CONVERTIBLE and d != "float64" for d in dtypes) and _library() is not None


def weighted_sum(values: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float],
                 divisor: float | None) -> np.ndarray:
    """Σ fp32(w_i)·x_i accumulated with one rounding per term, then ``/ fp32(divisor)`` when given: flat fp32.

    ``values`` are raw storages of equal length (``dtypes``: float32, float16 or bfloat16)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the host merge kernel is not available (no C compiler)")
    flats = [v.reshape(-1) for v in values]
    n = flats[0].size
    out = np.empty(n, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    ptrs = (ctypes.c_void_p * len(flats))()
    for lo in range(0, n, BLOCK):
        hi = min(n, lo + BLOCK)
        blocks = [x[lo:hi] if d == "float32" else convert(x[lo:hi], d, "float32") for x, d in zip(flats, dtypes)]
        blocks = [np.ascontiguousarray(b) for b in blocks]
        for i, b in enumerate(blocks):
            ptrs[i] = b.ctypes.data
        lib.weighted_sum_f32(ptrs, w.ctypes.data, len(blocks), hi - lo, 0.0 if divisor is None else divisor,
                             0 if divisor is None else 1, out[lo:hi].ctypes.data)
    return out
