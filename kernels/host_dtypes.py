"""Float dtype conversions and NaN/Inf checks on raw tensor bytes, in numpy, byte-identical to torch on CPU.

Casting and copying a checkpoint needs no tensor library: these kernels let ``cast``/``drop``/``rename`` run
without importing torch (about 2 s of CPU per process). Arrays hold a tensor's storage: ``float64``/``float32``/
``float16`` as themselves, ``bfloat16`` as ``uint16`` bit patterns (numpy has no bfloat16), float8 as ``uint8``.

What torch does, and what is reproduced here (``tests/test_host_dtypes.py`` compares bytes with torch):
- float32 -> bfloat16: round to nearest, ties to even, on the bit pattern (``u + 0x7FFF + lsb >> 16``); every
  NaN becomes ``0xFFFF`` (torch's vectorised CPU kernel), overflow becomes ±Inf.
- float32 -> float16: IEEE round to nearest even with subnormals and overflow to ±Inf (numpy's cast); a NaN
  keeps its sign and the top 10 bits of its payload with the quiet bit set (the F16C instruction torch uses),
  where numpy keeps signalling NaNs signalling.
- float64 -> bfloat16 / float16: through float32 (torch converts a double to float first: two roundings).
- float16 -> bfloat16: through float32; a NaN becomes ``0x7FC0`` (torch's scalar conversion, not the vector one).
- float64 -> bfloat16 and float16 -> float32 of a tensor holding a NaN: torch's NaN bits depend on where the NaN
  sits (its vector loop's body or its scalar tail, whose places move with the thread count), so such a tensor is
  converted by torch itself (imported only then; the default NaN check refuses those tensors anyway).
- widening (bfloat16/float16 -> float32/float64, float32 -> float64) and float64 -> float32: exact or one
  IEEE rounding, NaN payloads as the CPU's conversion instructions keep them (numpy uses the same ones).
Work goes in chunks of :data:`CHUNK` elements so temporaries stay in cache and memory stays flat. float32 ->
bfloat16, the cast users run most, is one pass of a small C kernel where a compiler exists (0.3 ns per element
here, against 1.5 ns for the numpy steps), and float32/bfloat16 -> float16 use the F16C instruction where the CPU
has it (same bytes; the tests run the C and the numpy paths).
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from surgeon.kernels.cbuild import compiled_library, cpu_flags

CHUNK = 1 << 18  # elements per step: 1 MiB of float32 temporaries, cache-resident

#: dtype name (torch's) -> numpy storage dtype of the raw bytes
STORAGE = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
    "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
}
#: float dtypes converted here (float8 is only checked, never converted)
CONVERTIBLE = frozenset({"float64", "float32", "float16", "bfloat16"})
#: float dtype -> (unsigned view, mask of the magnitude bits, smallest magnitude pattern that is Inf or NaN)
_NONFINITE_BITS = {
    "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
    "float16": (np.uint16, 0x7FFF, 0x7C00),
    "float8_e5m2": (np.uint8, 0x7F, 0x7C),
    "float8_e4m3fn": (np.uint8, 0x7F, 0x7F),  # no Inf; NaN is S.1111.111
}


def _f32_to_bf16(x: np.ndarray, out: np.ndarray, scratch: np.ndarray, nan: int = 0xFFFF) -> None:
    """float32 -> bfloat16 bits, round to nearest even (``(u + 0x7FFF + lsb) >> 16``); NaN -> ``nan``."""
    u = x.view(np.uint32)
    t = scratch[: u.size]
    np.right_shift(u, 16, out=t)
    t &= 1
    t += 0x7FFF
    t += u
    t >>= 16
    np.copyto(out, t, casting="unsafe")
    if x.size and np.isnan(x.max()):  # max propagates NaN: one pass finds whether there is any
        out[np.isnan(x)] = nan


_F32_TO_BF16_SOURCE = r"""
#include <stdint.h>
/* float32 bit patterns -> bfloat16 bit patterns: round to nearest, ties to even, on the pattern (uint32 wraps as
   numpy's does); every NaN becomes `nan`. No branch in the loop body, so it vectorises. */
void f32_to_bf16(const uint32_t *in, uint16_t *out, int64_t n, uint16_t nan) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = in[i];
        uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        out[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : r;
    }
}
"""


def _declare_f32_to_bf16(lib: ctypes.CDLL) -> None:
    lib.f32_to_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint16]
    lib.f32_to_bf16.restype = None


@functools.cache
def _f32_to_bf16_library() -> ctypes.CDLL | None:
    return compiled_library("f32_to_bf16", _F32_TO_BF16_SOURCE, ["-O3", "-std=c11"], _declare_f32_to_bf16)


def _f32_to_bf16_c(x: np.ndarray, out: np.ndarray) -> bool:
    """float32 -> bfloat16 bits (NaN -> ``0xFFFF``) by the C kernel; False where it is not built."""
    lib = _f32_to_bf16_library()
    if lib is None:
        return False
    x = np.require(x, requirements=["C", "A"])  # a copy when unaligned: the compiled loop may assume 4-byte loads
    lib.f32_to_bf16(x.ctypes.data, out.ctypes.data, x.size, 0xFFFF)
    return True


_TO_F16_SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>
/* float32 (or bfloat16 widened exactly to float32) -> float16 with the F16C instruction torch's CPU kernels use:
   IEEE round to nearest even, subnormals, overflow to Inf; a NaN keeps its sign and the top 10 bits of its
   payload with the quiet bit set. Eight at a time, the tail one at a time through the same instruction. */
#define ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline uint16_t one(float x) { return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(x), ROUND), 0); }
void f32_to_f16(const float *in, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(in + i), ROUND));
    for (; i < n; i++) out[i] = one(in[i]);
}
void bf16_to_f16(const uint16_t *in, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(in + i))), 16);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_castsi256_ps(wide), ROUND));
    }
    for (; i < n; i++) {
        uint32_t u = (uint32_t)in[i] << 16;
        float x;
        __builtin_memcpy(&x, &u, 4);
        out[i] = one(x);
    }
}
"""


def _declare_to_f16(lib: ctypes.CDLL) -> None:
    for name in ("f32_to_f16", "bf16_to_f16"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = None


@functools.cache
def _to_f16_library() -> ctypes.CDLL | None:
    """The F16C kernels, where the CPU has F16C and AVX2 (x86-64 since 2013) and a compiler exists."""
    if not {"f16c", "avx2"} <= cpu_flags():
        return None
    return compiled_library("to_f16", _TO_F16_SOURCE, ["-O3", "-std=c11", "-mavx2", "-mf16c"], _declare_to_f16)


def _to_f16_c(x: np.ndarray, src: str, out: np.ndarray) -> bool:
    """float32 or bfloat16 storage -> float16 by the F16C kernel; False where it is not built."""
    lib = _to_f16_library()
    if lib is None or src not in ("float32", "bfloat16"):
        return False
    x = np.require(x, requirements=["C", "A"])
    (lib.f32_to_f16 if src == "float32" else lib.bf16_to_f16)(x.ctypes.data, out.ctypes.data, x.size)
    return True


def _f32_to_f16(x: np.ndarray, out: np.ndarray) -> None:
    """float32 -> float16 (IEEE, numpy); NaN quieted with its payload's top bits kept, as F16C does."""
    np.copyto(out, x, casting="unsafe")
    if x.size and np.isnan(x.max()):
        nan = np.isnan(x)
        u = x.view(np.uint32)[nan]
        bits = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x03FF)
        out.view(np.uint16)[nan] = bits.astype(np.uint16)


def _as_f32(x: np.ndarray, src: str, scratch: np.ndarray) -> np.ndarray:
    """``x`` as float32 (exact for bfloat16/float16, one rounding for float64), in ``scratch``."""
    if src == "float32":
        return x
    t = scratch[: x.size]
    if src == "bfloat16":
        np.copyto(t, x, casting="unsafe")
        t <<= 16
        return t.view(np.float32)
    f32 = t.view(np.float32)
    np.copyto(f32, x, casting="unsafe")
    return f32


def convert(src: np.ndarray, src_dtype: str, dst_dtype: str) -> np.ndarray:
    """``src`` (storage of ``src_dtype``, any shape) converted to ``dst_dtype``'s storage, flat.

    Both dtypes must be in :data:`CONVERTIBLE`."""
    if src_dtype not in CONVERTIBLE or dst_dtype not in CONVERTIBLE:
        raise ValueError(f"no host conversion from {src_dtype} to {dst_dtype}")
    flat = src.reshape(-1)
    if src_dtype == dst_dtype:
        return flat.copy()
    if (src_dtype, dst_dtype) in TORCH_DECIDES_NAN and has_nan(flat, src_dtype):
        return _torch_convert(flat, src_dtype, dst_dtype)
    out = np.empty(flat.size, dtype=STORAGE[dst_dtype])
    if (src_dtype, dst_dtype) == ("float32", "bfloat16") and _f32_to_bf16_c(flat, out):
        return out
    if dst_dtype == "float16" and _to_f16_c(flat, src_dtype, out):
        return out
    scratch = (np.empty(min(CHUNK, flat.size), np.uint32), np.empty(min(CHUNK, flat.size), np.uint32))
    with np.errstate(all="ignore"):  # overflow to Inf and NaN casts are the intended results
        for lo in range(0, flat.size, CHUNK):
            _convert_chunk(flat[lo:lo + CHUNK], src_dtype, dst_dtype, out[lo:lo + CHUNK], scratch)
    return out


#: conversions whose NaN bits torch chooses by position (see the module docstring)
TORCH_DECIDES_NAN = frozenset({("float64", "bfloat16"), ("float16", "float32")})


def _torch_convert(flat: np.ndarray, src: str, dst: str) -> np.ndarray:
    import torch

    t = torch.from_numpy(flat.view(np.uint8).copy()).view(getattr(torch, src))
    return t.to(getattr(torch, dst)).view(torch.uint8).numpy().view(STORAGE[dst])


def has_nan(data: np.ndarray, dtype: str) -> bool:
    """True when ``data`` (storage of ``dtype``, one of :data:`CONVERTIBLE`) holds a NaN (Inf does not count)."""
    flat = data.reshape(-1)
    for lo in range(0, flat.size, CHUNK):
        x = flat[lo:lo + CHUNK]
        if dtype in ("float32", "float64"):
            found = bool(x.size) and bool(np.isnan(x.max()))
        else:
            view, mask, first = _NONFINITE_BITS[dtype]
            found = bool(x.size) and int((x.view(view) & mask).max()) > first
        if found:
            return True
    return False


def _convert_chunk(x: np.ndarray, src: str, dst: str, out: np.ndarray,
                   scratch: tuple[np.ndarray, np.ndarray]) -> None:
    if dst in ("float64", "float32"):  # widening, or float64 -> float32: one IEEE cast (through float32)
        np.copyto(out, x if src in ("float64", "float32") else _as_f32(x, src, scratch[0]), casting="unsafe")
        return
    f32 = _as_f32(x, src, scratch[0])
    if dst == "float16":
        _f32_to_f16(f32, out)
    else:  # torch's float16 -> bfloat16 goes through its scalar conversion, whose NaN is 0x7FC0
        _f32_to_bf16(f32, out, scratch[1], nan=0x7FC0 if src == "float16" else 0xFFFF)


def has_nonfinite(data: np.ndarray, dtype: str) -> bool:
    """True when ``data`` (storage of the float ``dtype``, any shape) holds a NaN or an Inf.

    float32/float64: a sum propagates both and is one pass; only when it is not finite (possibly an overflow of
    finite values) does the exact check run. The others compare the magnitude bits with the all-ones exponent."""
    flat = data.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # the sum may overflow: then the exact check decides
        for lo in range(0, flat.size, CHUNK):
            if _chunk_nonfinite(flat[lo:lo + CHUNK], dtype):
                return True
    return False


def _chunk_nonfinite(x: np.ndarray, dtype: str) -> bool:
    if not x.size:
        return False
    if dtype in ("float32", "float64"):
        return not np.isfinite(np.add.reduce(x)) and not bool(np.isfinite(x).all())
    view, mask, first = _NONFINITE_BITS[dtype]
    return int((x.view(view) & mask).max()) >= first
