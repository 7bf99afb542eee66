"""Linear, task-arithmetic and TIES merges on raw fp32 storage, without torch, byte-identical to torch's CPU arithmetic.

``linear_merge`` in ``ops/merge/classic.py`` (and mergekit's ``linear``) accumulates ``acc.add_(v, alpha=w)`` from
zeros, then ``acc.div_(Σw)``. On CPU torch computes each accumulation as one fused multiply-add with the weight
rounded to fp32 (a single rounding: numpy's ``acc += w * v`` rounds twice and differs in about 30 % of entries),
and divides by the fp32 divisor with an IEEE division. The C kernel here does the same per element: ``fmaf``
(correctly rounded by definition, a hardware FMA where the CPU has one), then ``/``, compiled without fast-math
and with ``-ffp-contract=off`` so the compiler may not re-associate or fuse anything else.
``tests/test_host_merge.py`` compares bytes with torch on random, tail-length and edge-case inputs.

Task arithmetic (``task_arithmetic``): ``acc.add_(θ_i − θ_b, alpha=w_i)`` is ``fmaf(θ_i − θ_b, w_i, acc)`` after the
rounded subtraction, and ``θ_b.add_(acc, alpha=λ)`` is ``fmaf(acc, λ, θ_b)`` (``θ_b + acc`` when λ = 1).

TIES (``ties_merge`` with the weighted election): the trim masks come from :mod:`surgeon.kernels.tie_order`
(torch's sort's choice among tied magnitudes), and :func:`ties_combine` replays ``ties_merge``'s chunk arithmetic
per element in torch's order: τ_i = (θ_i − θ_b)·m_i, w_i·τ_i, sums over the models accumulated from +0 left to
right (as torch's reduction over the models' dimension does: the sign of a zero sum is +), the sign election
(+1 when the sum is ≥ 0), the agreeing entries and weights, the division, then θ_b + λ·mean as two roundings.

Work goes in blocks of :data:`BLOCK` elements: each input block is converted to fp32 when it is not fp32 already
(exact widening of bfloat16/float16), so memory holds the output and one block per input beyond the sources.
"""
from __future__ import annotations

import ctypes
import functools
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

/* task_arithmetic (bx: the base, then the k models): acc = fma(x_i - b, w_i, acc) from zeros, / divisor when divide, then fma(acc, scale, b) when
   use_scale (torch's b.add_(acc, alpha=scale)) or b + acc */
void task_arithmetic_f32(const float *const *bx, const float *w, int64_t k, int64_t n, float divisor,
                         int32_t divide, float scale, int32_t use_scale, float *out) {
  const float *base = bx[0], *const *xs = bx + 1;
  for (int64_t j = 0; j < n; j++) {
    const float b = base[j];
    float acc = 0.0f;
    for (int64_t i = 0; i < k; i++) acc = fmaf(xs[i][j] - b, w[i], acc);
    if (divide) acc = acc / divisor;
    out[j] = use_scale ? fmaf(acc, scale, b) : b + acc;
  }
}

/* ties_merge's chunk step (weighted election; bx: the base, then k <= 16 models, Python allows 5): see the
   module docstring */
void ties_combine_f32(const float *const *bx, const uint8_t *const *masks, const float *w, int64_t k, int64_t n,
                      float scale, int32_t normalize, float *out) {
  const float *base = bx[0], *const *xs = bx + 1;
  for (int64_t j = 0; j < n; j++) {
    const float b = base[j];
    float wt[16];
    float s = 0.0f;
    for (int64_t i = 0; i < k; i++) {
      const float tau = (xs[i][j] - b) * (masks[i][j] ? 1.0f : 0.0f);
      wt[i] = tau * w[i];
      s = s + wt[i];
    }
    const float gamma = s >= 0.0f ? 1.0f : -1.0f;
    float mixed = 0.0f, divisor = 0.0f;
    for (int64_t i = 0; i < k; i++) {
      const float sg = wt[i] > 0.0f ? 1.0f : (wt[i] < 0.0f ? -1.0f : 0.0f);
      const float agree = sg == gamma ? 1.0f : 0.0f;
      mixed = mixed + wt[i] * agree;
      divisor = divisor + w[i] * agree;
    }
    if (normalize) {
      if (divisor == 0.0f) divisor = 1.0f;
      mixed = mixed / divisor;
    }
    const float step = mixed * scale;
    out[j] = b + step;
  }
}
"""


MAX_TIES_MODELS = 5  # torch's reduction over more models groups the sums differently (measured at 6)


def _declare(lib: ctypes.CDLL) -> None:
    lib.weighted_sum_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_float, ctypes.c_int32, ctypes.c_void_p]
    lib.weighted_sum_f32.restype = None
    lib.ties_combine_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p]
    lib.ties_combine_f32.restype = None
    lib.task_arithmetic_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_float, ctypes.c_int32, ctypes.c_float, ctypes.c_int32,
                                        ctypes.c_void_p]
    lib.task_arithmetic_f32.restype = None


@functools.cache
def _library() -> ctypes.CDLL | None:
    flags = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math"]
    if {"fma", "avx2"} <= cpu_flags():
        flags += ["-mfma", "-mavx2"]  # fmaf becomes the vector FMA instruction; still one rounding
    return compiled_library("host_merge", _SOURCE, flags, _declare)


def available(dtypes: Sequence[str]) -> bool:
    """True when the kernel is built and every input dtype can be widened to fp32 here."""
    return all(d in CONVERTIBLE and d != "float64" for d in dtypes) and _library() is not None


def ties_available(dtypes: Sequence[str], n_models: int) -> bool:
    """True when the host TIES kernels can merge ``n_models`` models (the base not counted) of these dtypes."""
    from surgeon.kernels import tie_order

    return 1 <= n_models <= MAX_TIES_MODELS and available(dtypes) and tie_order.available(1)


def _fp32_blocks(arrays: Sequence[np.ndarray], dtypes: Sequence[str]):
    """Per block of :data:`BLOCK` entries: ``(lo, hi, blocks, pointers)``: each array's block as contiguous fp32
    (a view of fp32 data, else a widened copy alive until the next block) and their addresses (a ctypes array)."""
    flats = [a.reshape(-1) for a in arrays]
    ptrs = (ctypes.c_void_p * len(flats))()
    for lo in range(0, flats[0].size, BLOCK):
        hi = min(flats[0].size, lo + BLOCK)
        blocks = [np.ascontiguousarray(x[lo:hi] if d == "float32" else convert(x[lo:hi], d, "float32"))
                  for x, d in zip(flats, dtypes)]
        for i, blk in enumerate(blocks):
            ptrs[i] = blk.ctypes.data
        yield lo, hi, blocks, ptrs


def _kernels() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the host merge kernels are not available (no C compiler)")
    return lib


def weighted_sum(values: Sequence[np.ndarray], dtypes: Sequence[str], weights: Sequence[float],
                 divisor: float | None) -> np.ndarray:
    """Σ fp32(w_i)·x_i accumulated with one rounding per term, then ``/ fp32(divisor)`` when given: flat fp32.

    ``values`` are raw storages of equal length (``dtypes``: float32, float16 or bfloat16)."""
    lib = _kernels()
    out = np.empty(values[0].size, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    for lo, hi, _, ptrs in _fp32_blocks(values, dtypes):
        lib.weighted_sum_f32(ptrs, w.ctypes.data, len(values), hi - lo, 0.0 if divisor is None else divisor,
                             0 if divisor is None else 1, out[lo:hi].ctypes.data)
    return out


def trim_masks(base: np.ndarray, base_dtype: str, values: Sequence[np.ndarray], dtypes: Sequence[str],
               densities: Sequence[float]) -> list[np.ndarray] | None:
    """TIES trim masks (``k = int(density·n)`` largest |θ_i − θ_b|, ties as torch's sort keeps them), flat bool;
    None when a difference is not finite (the caller's torch path then raises its error)."""
    from surgeon.kernels.tie_order import sort_top_k_mask

    b = base.reshape(-1)
    n = b.size
    masks = []
    for x, dtype, density in zip(values, dtypes, densities):
        if density >= 1.0:
            masks.append(np.ones(n, dtype=np.bool_))
            continue
        k = int(density * n)
        if k <= 0:
            masks.append(np.zeros(n, dtype=np.bool_))
            continue
        tau = np.empty(n, dtype=np.float32)
        with np.errstate(all="ignore"):
            for lo, hi, (xb, bb), _ in _fp32_blocks([x, b], [dtype, base_dtype]):
                np.subtract(xb, bb, out=tau[lo:hi])
                np.abs(tau[lo:hi], out=tau[lo:hi])
                if not np.isfinite(np.max(tau[lo:hi])):
                    return None
        masks.append(sort_top_k_mask(tau, k))
        del tau
    return masks


def ties_combine(base: np.ndarray, base_dtype: str, values: Sequence[np.ndarray], dtypes: Sequence[str],
                 masks: Sequence[np.ndarray], weights: Sequence[float], *, scale: float,
                 normalize: bool) -> np.ndarray:
    """θ_b + λ·(disjoint mean of the trimmed task vectors), flat fp32: ``ties_merge``'s bytes (weighted election)."""
    if len(values) > MAX_TIES_MODELS:
        raise RuntimeError(f"the host TIES kernel takes at most {MAX_TIES_MODELS} models")
    lib = _kernels()
    out = np.empty(base.size, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    ms = (ctypes.c_void_p * len(values))()
    for lo, hi, _, ptrs in _fp32_blocks([base, *values], [base_dtype, *dtypes]):
        for i, m in enumerate(masks):
            ms[i] = m[lo:hi].ctypes.data
        lib.ties_combine_f32(ptrs, ms, w.ctypes.data, len(values), hi - lo, float(scale), 1 if normalize else 0,
                             out[lo:hi].ctypes.data)
    return out


def task_arithmetic(base: np.ndarray, base_dtype: str, values: Sequence[np.ndarray], dtypes: Sequence[str],
                    weights: Sequence[float], *, divisor: float | None, scale: float) -> np.ndarray:
    """θ_b + λ·Σ w_i (θ_i − θ_b) (the sum / ``divisor`` when given), flat fp32: ``task_arithmetic``'s bytes."""
    lib = _kernels()
    out = np.empty(base.size, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    for lo, hi, _, ptrs in _fp32_blocks([base, *values], [base_dtype, *dtypes]):
        lib.task_arithmetic_f32(ptrs, w.ctypes.data, len(values), hi - lo, 0.0 if divisor is None else divisor,
                                0 if divisor is None else 1, float(scale), 0 if scale == 1.0 else 1,
                                out[lo:hi].ctypes.data)
    return out
