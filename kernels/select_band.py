"""Per-matrix magnitude pruning in one read of the weights: zero below a sampled bracket, then patch inside it.

The two-pass route (:func:`surgeon.kernels.select.threshold_of_chunks`, then
:func:`surgeon.kernels.select.zero_below_bits`) reads every weight twice: the exact threshold must be known before
the first entry is written. Here the output is written during the one pass that finds it:

1. draw a stratified sample of |w| keys (:func:`sample_keys`) and take the bracket ``[lo, hi]`` that holds the
   k-th key with high probability: the sample's keys at :func:`surgeon.kernels.select.bracket_ranks`, selected in
   C (``select_pair``; ~2.8 % of the entries for a sample of 32 K);
2. one pass (a small C kernel, AVX-512 where the CPU has it): ``out = w`` with the keys below ``lo`` zeroed,
   counting them and listing the keys inside the bracket with their flat positions;
3. the exact k-th key ``t`` among the listed ones (``select_key``), and the listed entries below ``t``, plus the
   first ties equal to it in flat order, are zeroed in ``out`` (``patch_below``).

The bytes are those of the two-pass route (tests compare); fp32 and bfloat16 storage are handled in place of
their bits (a bfloat16 key is the fp32 key of the widened value, so the selection is the same). Where the bracket
misses (about 1 in 3.5 M), the listing overflows, no compiler exists, or the storage is another dtype, the caller
gets None and takes the two-pass route.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from surgeon.kernels.cbuild import compiled_library, cpu_flags

from .select import BRACKET_MIN, NonFiniteInput, bracket_ranks, sample_size

_SOURCE = r"""
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
/* out = src with |x| below lo zeroed (magnitude bits: the order of |x|; out NULL: nothing written, the pass
   only counts and lists); counts[0] += entries below lo,
   counts[1] += entries inside [lo, lo + width], counts[2] += NaN/Inf. The inside entries' keys (magnitude |
   0x80000000, the order-preserving key of |x|) and flat positions (pos NULL: not listed) are listed while fewer
   than cap - 16 are; the caller sees an overflow as counts[1] > cap - 16. */
#define BODY(LOAD, STORE_ZERO, STORE_KEEP)                                                              \
    for (; i < n; i++) {                                                                                \
        uint32_t b = LOAD, m = b & 0x7FFFFFFFu;                                                         \
        uint32_t below_i = m < lo, in_i = (uint32_t)(m - lo) <= width;                                  \
        below += below_i;                                                                               \
        bad += m >= 0x7F800000u;                                                                        \
        if (out) { if (below_i) STORE_ZERO; else STORE_KEEP; }                                          \
        if (c + 16 <= cap) { keys[c] = m | 0x80000000u; if (pos) pos[c] = (uint32_t)i; }               \
        c += in_i;                                                                                      \
    }

#ifdef __AVX512F__
/* BODY sixteen at a time: LOAD_VEC gives the entries widened to fp32 bit patterns in `b`, STORE_VEC stores
   `kept` (b with the entries below lo zeroed) in the source's width. NaN/Inf via the largest magnitude seen. */
#define BODY16(LOAD_VEC, STORE_VEC)                                                                     \
    {                                                                                                   \
        const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), sign = _mm512_set1_epi32((int)0x80000000u);  \
        const __m512i vlo = _mm512_set1_epi32((int)lo), vw = _mm512_set1_epi32((int)width);             \
        const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);    \
        __m512i top = _mm512_setzero_si512();                                                           \
        for (; i + 16 <= n; i += 16) {                                                                  \
            __m512i b = LOAD_VEC, m = _mm512_and_si512(b, mag);                                         \
            __mmask16 lt = _mm512_cmplt_epu32_mask(m, vlo);                                             \
            __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(m, vlo), vw);                       \
            __m512i kept = _mm512_maskz_mov_epi32((__mmask16)~lt, b);                                   \
            below += __builtin_popcount(lt);                                                            \
            top = _mm512_max_epu32(top, m);                                                             \
            if (out) STORE_VEC;                                                                         \
            if (c + 16 <= cap) {                                                                        \
                __m512i at = _mm512_add_epi32(_mm512_set1_epi32((int)i), iota);                         \
                _mm512_storeu_si512((void *)(keys + c), _mm512_maskz_compress_epi32(in, _mm512_or_si512(m, sign))); \
                if (pos) _mm512_storeu_si512((void *)(pos + c), _mm512_maskz_compress_epi32(in, at));   \
            }                                                                                           \
            c += __builtin_popcount(in);                                                                \
        }                                                                                               \
        bad += _mm512_reduce_max_epu32(top) >= 0x7F800000u;                                             \
    }
#else
#define BODY16(LOAD_VEC, STORE_VEC)
#endif

void band_zero_f32(const uint32_t *src, uint32_t *out, int64_t n, uint32_t lo, uint32_t width,
                   uint32_t *keys, uint32_t *pos, int64_t cap, int64_t *counts) {
    int64_t i = 0, below = 0, bad = 0, c = 0;
    BODY16(_mm512_loadu_si512((const void *)(src + i)), _mm512_storeu_si512((void *)(out + i), kept))
    BODY(src[i], out[i] = 0, out[i] = b)
    counts[0] += below; counts[1] += c; counts[2] += bad;
}

void band_zero_bf16(const uint16_t *src, uint16_t *out, int64_t n, uint32_t lo, uint32_t width,
                    uint32_t *keys, uint32_t *pos, int64_t cap, int64_t *counts) {
    int64_t i = 0, below = 0, bad = 0, c = 0;
    BODY16(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i))), 16),
           _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(kept, 16))))
    BODY((uint32_t)src[i] << 16, out[i] = 0, out[i] = src[i])
    counts[0] += below; counts[1] += c; counts[2] += bad;
}

/* One radix step over keys[0..n): the keys whose bin (over the keys' span, at most 4096 bins) holds ranks
   ra..rb are gathered into `into` (in order); returns how many, sets *before to the count of smaller bins.
   *span_one: every key equal (into is then not written). */
static int64_t radix_step(const uint32_t *a, int64_t n, int64_t ra, int64_t rb, uint32_t *into, int64_t *before,
                          uint32_t *only) {
    int32_t hist[4096];
    uint32_t mn = 0xFFFFFFFFu, mx = 0;
    for (int64_t i = 0; i < n; i++) { mn = a[i] < mn ? a[i] : mn; mx = a[i] > mx ? a[i] : mx; }
    if (mn == mx) { *only = mn; return -1; }
    int shift = 0;
    while (((mx - mn) >> shift) >= 4096) shift++;
    int64_t bins = ((int64_t)(mx - mn) >> shift) + 1;
    for (int64_t b = 0; b < bins; b++) hist[b] = 0;
    for (int64_t i = 0; i < n; i++) hist[(a[i] - mn) >> shift]++;
    int64_t ba = 0, acc = 0;
    while (acc + hist[ba] <= ra) acc += hist[ba++];
    *before = acc;
    int64_t bb = ba, acc_b = acc;
    while (acc_b + hist[bb] <= rb) acc_b += hist[bb++];
    uint32_t first = (uint32_t)ba, width = (uint32_t)(bb - ba);
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        into[m] = a[i];
        m += (uint32_t)(((a[i] - mn) >> shift) - first) <= width;
    }
    return m;
}

/* The key of rank `rank` (0-based) among keys[0..n) (not modified): radix steps into `scratch` (room for n
   keys) until a few keys are left, then an insertion sort. */
uint32_t select_key(const uint32_t *keys, int64_t n, int64_t rank, uint32_t *scratch) {
    const uint32_t *a = keys;
    while (n > 32) {
        int64_t before = 0;
        uint32_t only = 0;
        int64_t m = radix_step(a, n, rank, rank, scratch, &before, &only);
        if (m < 0) return only;
        a = scratch; n = m; rank -= before;
    }
    uint32_t s[32];
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = a[i];
        int64_t j = i;
        for (; j > 0 && s[j - 1] > v; j--) s[j] = s[j - 1];
        s[j] = v;
    }
    return s[rank];
}

/* The keys of ranks ra <= rb among keys[0..n) into got[0], got[1]: one radix step for both, then select_key
   on the keys between them. `scratch`: room for 2n keys. */
void select_pair(const uint32_t *keys, int64_t n, int64_t ra, int64_t rb, uint32_t *scratch, uint32_t *got) {
    int64_t before = 0;
    uint32_t only = 0;
    int64_t m = radix_step(keys, n, ra, rb, scratch, &before, &only);
    if (m < 0) { got[0] = got[1] = only; return; }
    got[0] = select_key(scratch, m, ra - before, scratch + n);
    got[1] = select_key(scratch, m, rb - before, scratch + n);
}

/* keys[j] = the order-preserving key of |src[pos[j]]| (magnitude bits | 0x80000000); `wide`: fp32 src, else
   bfloat16. */
#define AHEAD 16  /* entries prefetched ahead: the positions are scattered over memory that may be cold */
void keys_at(const void *src, const uint32_t *pos, int64_t c, uint32_t *keys, int wide) {
    const uint32_t *s32 = src;
    const uint16_t *s16 = src;
    for (int64_t j = 0; j < c; j++) {
        if (j + AHEAD < c) __builtin_prefetch(wide ? (const void *)(s32 + pos[j + AHEAD]) : (const void *)(s16 + pos[j + AHEAD]));
        keys[j] = (wide ? s32[pos[j]] : (uint32_t)s16[pos[j]] << 16) | 0x80000000u;
    }
}

/* Zero out[pos[j]] for the listed keys below t and the first `need - (listed keys below t)` equal to t
   (the listing is in flat order: ties go by flat index). `wide`: out holds 4-byte (else 2-byte) entries. */
void patch_below(const uint32_t *keys, const uint32_t *pos, int64_t c, uint32_t t, int64_t need, void *out,
                 int wide) {
    int64_t less = 0;
    for (int64_t j = 0; j < c; j++) less += keys[j] < t;
    int64_t ties = need - less;
    for (int64_t j = 0; j < c; j++) {  /* branch-free: half the listed entries are zeroed, in no order */
        uint32_t eq = keys[j] == t, owed = ties > 0, zero = (keys[j] < t) | (eq & owed);
        ties -= eq & owed;
        if (j + AHEAD < c) __builtin_prefetch(wide ? (void *)((uint32_t *)out + pos[j + AHEAD]) : (void *)((uint16_t *)out + pos[j + AHEAD]), 1);
        if (wide) ((uint32_t *)out)[pos[j]] &= zero - 1u; else ((uint16_t *)out)[pos[j]] &= (uint16_t)(zero - 1u);
    }
}
"""

#: bit-pattern storage of the dtypes the kernel reads and writes in place of their bits
_STORAGE = {"float32": np.uint32, "bfloat16": np.uint16}
#: listed keys the pass leaves room for, in expected bracket populations (the rest of a run's miss chance)
_ROOM = 4


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("band_zero_f32", "band_zero_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    lib.select_key.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.select_key.restype = ctypes.c_uint32
    lib.select_pair.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_void_p]
    lib.select_pair.restype = None
    lib.patch_below.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int64,
                                ctypes.c_void_p, ctypes.c_int]
    lib.patch_below.restype = None
    lib.keys_at.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.keys_at.restype = None


@functools.cache
def build(avx512: bool) -> ctypes.CDLL | None:
    """The kernels, vectorised with AVX-512 (``-mavx512f``) or as the portable loop; None without a compiler."""
    return compiled_library("band_zero", _SOURCE, ["-O3", "-std=c11"] + (["-mavx512f"] if avx512 else []),
                            _declare)


def _library() -> ctypes.CDLL | None:
    """The AVX-512 build where the CPU has it, else the portable one."""
    return build("avx512f" in cpu_flags())


def split_band(data: np.ndarray, dtype: str, lo: int, hi: int) -> tuple[np.ndarray, int, int] | None:
    """:func:`surgeon.kernels.select.split_bracket` of |x| (``absolute``) by the C pass, on fp32 or bfloat16
    storage as it is (no conversion): (the keys inside ``[lo, hi]`` in flat order, how many lie below ``lo``,
    how many are NaN/Inf); None where the kernels are not built or the dtype is another."""
    lib = _library()
    if lib is None or dtype not in _STORAGE or data.size >= 1 << 32:
        return None
    bits = np.ascontiguousarray(data.reshape(-1)).view(_STORAGE[dtype])
    lo_m = max(lo, 0x80000000) - 0x80000000
    hi_m = max(hi, 0x80000000) - 0x80000000
    keys = np.empty(bits.size + 16, np.uint32)  # pages never written are never backed: only the band costs
    counts = np.zeros(3, np.int64)
    fn = lib.band_zero_f32 if dtype == "float32" else lib.band_zero_bf16
    fn(bits.ctypes.data, None, bits.size, lo_m, hi_m - lo_m, keys.ctypes.data, None, keys.size, counts.ctypes.data)
    return keys[: counts[1]].copy(), int(counts[0]), int(counts[2])


def sample_keys(data: np.ndarray, dtype: str, size: int, seed: int) -> np.ndarray | None:
    """Keys of |x| (order-preserving, as :func:`surgeon.kernels.select.keys_of`) of ``size`` entries of flat
    fp32/bfloat16 storage, one per stratum (:func:`stratified_sample`), gathered by the C kernel; None where the
    kernels are not built or the dtype is another."""
    lib = _library()
    if lib is None or dtype not in _STORAGE or not 1 <= size <= data.size < 1 << 32:
        return None
    bits = np.ascontiguousarray(data.reshape(-1)).view(_STORAGE[dtype])
    at = stratified_sample(bits.size, size, seed)
    keys = np.empty(size, np.uint32)
    lib.keys_at(bits.ctypes.data, at.ctypes.data, size, keys.ctypes.data, bits.itemsize == 4)
    return keys


@functools.lru_cache(maxsize=256)
def stratified_sample(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` flat indices in ``[0, n)`` (uint32), one drawn uniformly in each of ``size`` equal strata (a fixed
    seed: runs are reproducible), ascending, so gathering them reads memory forwards. Each stratum's draw is
    independent, so the count of sampled entries below any key is a sum of independent Bernoulli trials: its
    variance is at most the binomial one the bracket is sized for (Hoeffding 1956). Cached (read-only): the
    matrices of a model share a few sizes."""
    edges = (np.arange(size + 1, dtype=np.int64) * n) // size
    width = np.maximum(edges[1:] - edges[:-1], 1)
    draw = np.random.default_rng(seed).random(size)
    at = (edges[:-1] + (draw * width).astype(np.int64)).astype(np.uint32)
    at.setflags(write=False)
    return at


def zero_smallest_k_once(data: np.ndarray, dtype: str, k: int) -> np.ndarray | None:
    """Flat fp32/bfloat16 storage ``data`` (uint32/uint16 bits or float32 values) with its ``k`` smallest |x|
    zeroed (ties broken by flat index), read once, in the same storage type; None where the one-pass route does
    not apply (see the module docstring): the caller then selects in two passes. ``NonFiniteInput`` on NaN/Inf.
    ``1 <= k <= data.size``."""
    lib = _library()
    n = data.size
    if lib is None or dtype not in _STORAGE or not BRACKET_MIN <= n < 1 << 32:
        return None
    bits = np.ascontiguousarray(data.reshape(-1)).view(_STORAGE[dtype])
    wide = bits.itemsize == 4
    sample = sample_keys(bits, dtype, sample_size(n), seed=n)
    if sample is None:  # pragma: no cover - the same conditions as above
        return None
    a, b = bracket_ranks(sample.size, k / n)
    ends = np.empty(2, np.uint32)
    scratch = np.empty(2 * sample.size, np.uint32)
    lib.select_pair(sample.ctypes.data, sample.size, max(a, 0), min(b, sample.size - 1), scratch.ctypes.data,
                    ends.ctypes.data)
    lo_m = int(ends[0]) & 0x7FFFFFFF if a >= 0 else 0
    hi_m = int(ends[1]) & 0x7FFFFFFF if b < sample.size else 0x7FFFFFFF
    cap = min(n, _ROOM * 5 * n // int(np.sqrt(sample.size)) + 4096) + 16  # 5/√s: the bracket's expected share
    keys = np.empty(2 * cap, np.uint32)  # the listed keys, then the selection's scratch
    pos = np.empty(cap, np.uint32)
    out = np.empty_like(bits)
    counts = np.zeros(3, np.int64)
    fn = lib.band_zero_f32 if wide else lib.band_zero_bf16
    fn(bits.ctypes.data, out.ctypes.data, n, lo_m, hi_m - lo_m, keys.ctypes.data, pos.ctypes.data, cap,
       counts.ctypes.data)
    below, inside, bad = (int(c) for c in counts)
    if bad:
        raise NonFiniteInput("selection over a tensor with NaN or Inf values")
    need = k - below
    if inside > cap - 16 or not 1 <= need <= inside:
        return None
    t = lib.select_key(keys.ctypes.data, inside, need - 1, keys[cap:].ctypes.data)
    lib.patch_below(keys.ctypes.data, pos.ctypes.data, inside, t, need, out.ctypes.data, wide)
    return out
