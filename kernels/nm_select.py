"""N:M magnitude pruning on raw fp32/bfloat16 storage, group by group, in one pass (a small C kernel).

Every ``m`` consecutive entries form a group; the ``m - n`` smallest |x| of each become +0.0, ties zeroing the
lower index first: the bytes of :func:`surgeon.ops.prune.common.nm_prune` (a stable sort of |x| per group), which
the tests compare. Groups are independent, so a tensor can be pruned piece by piece as it is copied, whenever the
pieces hold whole groups. A bfloat16 entry's key is the fp32 key of the widened value; NaN keys are made equal (a
stable sort keeps NaNs in index order whatever their payload) and rank above every number, as in the sort.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from surgeon.kernels.cbuild import compiled_library

#: the largest group the kernel takes (its keys live in a fixed array)
MAX_M = 16

_SOURCE = r"""
#include <stdint.h>
/* Per group of m <= 16 entries: the rank of each |x| (magnitude bits, NaN made one value) among the group's,
   ties ranked by index, and the entries ranked below m - n zeroed in out (a copy of src). Branch-free: entry j's
   rank counts the earlier entries not larger and the later ones smaller. M: the group size as a constant
   (the compiler unrolls and vectorises across groups), or 0 for m given at run time. */
#define NM(NAME, T, WIDEN, M)                                                                               \
void NAME(const T *src, T *out, int64_t groups, int n, int m_) {                                          \
    const int m = M ? M : m_;                                                                             \
    for (int64_t g = 0; g < groups; g++) {                                                                \
        const T *s = src + g * m;                                                                         \
        T *o = out + g * m;                                                                               \
        uint32_t k[16];                                                                                   \
        for (int j = 0; j < m; j++) {                                                                     \
            uint32_t mag = WIDEN(s[j]) & 0x7FFFFFFFu;                                                     \
            k[j] = mag > 0x7F800000u ? 0x7F800001u : mag;                                                 \
        }                                                                                                 \
        for (int j = 0; j < m; j++) {                                                                     \
            int rank = 0;                                                                                 \
            for (int i = 0; i < m; i++) rank += i < j ? k[i] <= k[j] : (i > j && k[i] < k[j]);            \
            o[j] = rank < m - n ? 0 : s[j];                                                               \
        }                                                                                                 \
    }                                                                                                     \
}
#define SAME(x) ((uint32_t)(x))
#define WIDE16(x) ((uint32_t)(x) << 16)
NM(nm_zero_f32, uint32_t, SAME, 0)
NM(nm_zero_bf16, uint16_t, WIDE16, 0)
NM(nm_zero_f32_4, uint32_t, SAME, 4)
NM(nm_zero_bf16_4, uint16_t, WIDE16, 4)
"""

_STORAGE = {"float32": np.uint32, "bfloat16": np.uint16}


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("nm_zero_f32", "nm_zero_bf16", "nm_zero_f32_4", "nm_zero_bf16_4"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        fn.restype = None


@functools.cache
def _library() -> ctypes.CDLL | None:
    return compiled_library("nm_zero", _SOURCE, ["-O3", "-std=c11"], _declare)


def supported(dtype: str, m: int) -> bool:
    """fp32/bfloat16 storage, groups of at most :data:`MAX_M`, and the kernel built."""
    return dtype in _STORAGE and 1 <= m <= MAX_M and _library() is not None


def nm_zero(data: np.ndarray, dtype: str, n: int, m: int, out: np.ndarray | None = None) -> np.ndarray:
    """Flat fp32/bfloat16 storage ``data`` (whole groups: ``data.size % m == 0``) with the ``m - n`` smallest |x|
    of every ``m`` consecutive entries zeroed, in the same storage type (into ``out`` when given)."""
    if not supported(dtype, m):
        raise ValueError(f"N:M kernel: {dtype} with m={m} is not supported here")
    lib = _library()
    if data.size % m:
        raise ValueError(f"N:M kernel: {data.size} entries are not whole groups of {m}")
    bits = np.ascontiguousarray(data.reshape(-1)).view(_STORAGE[dtype])
    out = np.empty_like(bits) if out is None else out
    fn = getattr(lib, ("nm_zero_f32" if dtype == "float32" else "nm_zero_bf16") + ("_4" if m == 4 else ""))
    fn(bits.ctypes.data, out.ctypes.data, bits.size // m, n, m)
    return out
