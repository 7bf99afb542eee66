"""ShiftAdd CPU kernels: bit-plane packing, dequantisation and the LUT GEMV (numba), each with a torch reference.

Packed layout of one linear (ALGORITHMS.md §7.3), W ≈ Σ_i α_i ⊙ B_i with B_i ∈ {−1,+1}^{N×K}:

- ``qweight`` uint8 ``[q, N, KB]``, ``KB = ceil(K/8)``: bit j of byte g is the sign of column ``8g + j``
  (1 ↔ +1, 0 ↔ −1, little-endian bit order). Padding columns beyond K are 0 bits; activations are padded with
  zeros, so they contribute nothing.
- ``scales`` fp32 ``[q, N, G]``, ``G = ceil(K/gs)``: α of plane i, row n, group g (columns ``g·gs .. g·gs+gs−1``).
  ``gs`` is a multiple of 8, so a byte never straddles two groups.

LUT GEMV (§7.4): per 8 activations x_0..x_7 a table T[p] = Σ_j (bit_j(p) ? +x_j : −x_j) of 256 partial sums,
built as T[0] = −Σx_j, T[p + 2^j] = T[p] + 2x_j. Then y_n = Σ_i Σ_g α_{i,n,g} Σ_{bytes b of g} T_b[qweight_{i,n,b}]:
per weight byte one table lookup and one add, no multiplication except one per (plane, row, group).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit, prange

ROW_BLOCK = 128  # rows per parallel task


# --------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """``signs`` ``[..., K]`` (bool for +1, or ±1 numbers; 0 counts as +1) -> uint8 ``[..., ceil(K/8)]``."""
    bits = signs if signs.dtype == torch.bool else signs >= 0
    k = bits.shape[-1]
    pad = (-k) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad), value=False)
    bits = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8) if bits.numel() else bits[..., 0]


def unpack_signs(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``[..., KB]`` -> float32 ±1 ``[..., k]`` (inverse of :func:`pack_signs`)."""
    bits = (qweight.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=qweight.device)) & 1
    bits = bits.reshape(*qweight.shape[:-1], -1)[..., :k]
    return bits.to(torch.float32) * 2 - 1


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Dense ``W = Σ_i α_i ⊙ B_i`` (fp32 ``[N, K]``): the dense fallback and the oracle of every kernel."""
    signs = unpack_signs(qweight, in_features)  # [q, N, K]
    alpha = scales.float().repeat_interleave(group_size, dim=-1)[..., :in_features]  # [q, N, K]
    return (signs * alpha).sum(0)


# --------------------------------------------------------------------------------------------------------------
# numba LUT GEMV
# --------------------------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _build_tables(x, tables):  # pragma: no cover - numba
    """x: fp32 [M, KBp*8] (zero padded); tables: fp32 [M, KBp*256] (table of byte position b at b*256)."""
    m_count = x.shape[0]
    kb_count = x.shape[1] // 8
    for t in prange(m_count * kb_count):
        m = t // kb_count
        g = t - m * kb_count
        off = g * 256
        base = np.float32(0.0)
        for j in range(8):
            base -= x[m, g * 8 + j]
        tables[m, off] = base
        for j in range(8):
            step = np.float32(2.0) * x[m, g * 8 + j]
            half = 1 << j
            for p in range(half):
                tables[m, off + p + half] = tables[m, off + p] + step


@njit(parallel=True, cache=True, boundscheck=False)
def _lut_gemv_grouped(tables, qwt, sct, n_groups, q, n_rows, gb, y):  # pragma: no cover - numba
    """y[m, n] = Σ_g Σ_i sct[g,i,n] Σ_{b<gb} T_m[g·gb + b][qwt[g,i,n,b]].

    ``qwt`` is the group-major copy of ``qweight`` (flat ``[G, q, N, gb]``): for one group the bytes of all rows
    are contiguous, so a row block streams them while the group's tables (gb·1 KiB per batch row) stay in L1.
    Measured: the plain ``[q, N, KB]`` order with whole-K tables is 3–10× slower (table misses, strided bytes).
    """
    m_count = tables.shape[0]
    n_blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    for blk in prange(n_blocks):
        n0 = blk * ROW_BLOCK
        n1 = min(n_rows, n0 + ROW_BLOCK)
        acc = np.zeros((m_count, n1 - n0), dtype=np.float32)
        s = np.zeros(m_count, dtype=np.float32)
        for g in range(n_groups):
            tb = g * gb * 256
            for i in range(q):
                plane = (g * q + i) * n_rows
                for n in range(n0, n1):
                    p = (plane + n) * gb
                    a = sct[plane + n]
                    if m_count == 1:
                        s0 = np.float32(0.0)
                        s1 = np.float32(0.0)
                        b = 0
                        while b + 1 < gb:  # two accumulators break the add dependency chain
                            s0 += tables[0, tb + b * 256 + qwt[p + b]]
                            s1 += tables[0, tb + (b + 1) * 256 + qwt[p + b + 1]]
                            b += 2
                        if b < gb:
                            s0 += tables[0, tb + b * 256 + qwt[p + b]]
                        acc[0, n - n0] += a * (s0 + s1)
                    else:
                        s[:] = 0.0
                        for b in range(gb):
                            off = tb + b * 256 + qwt[p + b]
                            for m in range(m_count):
                                s[m] += tables[m, off]
                        for m in range(m_count):
                            acc[m, n - n0] += a * s[m]
        for m in range(m_count):
            for n in range(n0, n1):
                y[m, n] = acc[m, n - n0]


class CpuLutWeights:
    """One linear prepared for :func:`lut_gemv_prepared`: group-major bytes and fp32 scales (done once at load)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int):
        if group_size % 8:
            raise ValueError(f"group_size must be a multiple of 8, got {group_size}")
        q, n_rows, kb_count = qweight.shape
        self.q, self.n_rows, self.in_features, self.group_size = q, n_rows, in_features, group_size
        self.gb = group_size // 8
        self.n_groups = scales.shape[-1]
        kbp = self.n_groups * self.gb  # bytes padded to whole groups (padding bytes meet zero tables)
        qw = qweight.cpu().numpy()
        if kbp != kb_count:
            qw = np.pad(qw, ((0, 0), (0, 0), (0, kbp - kb_count)))
        self.qwt = np.ascontiguousarray(qw.reshape(q, n_rows, self.n_groups, self.gb).transpose(2, 0, 1, 3)).ravel()
        self.sct = np.ascontiguousarray(
            scales.detach().to(torch.float32).cpu().numpy().transpose(2, 0, 1)).ravel()
        self.kbp = kbp


def lut_gemv_prepared(x: torch.Tensor, w: CpuLutWeights) -> torch.Tensor:
    """``y = x @ Ŵᵀ`` for ``x`` [M, K] (computed in fp32) with the numba LUT kernel; returns fp32 [M, N]."""
    m_count = x.shape[0]
    xp = np.zeros((m_count, w.kbp * 8), dtype=np.float32)
    xp[:, :w.in_features] = x.detach().to(torch.float32).cpu().numpy()
    tables = np.empty((m_count, w.kbp * 256), dtype=np.float32)
    _build_tables(xp, tables)
    y = np.empty((m_count, w.n_rows), dtype=np.float32)
    _lut_gemv_grouped(tables, w.qwt, w.sct, w.n_groups, w.q, w.n_rows, w.gb, y)
    return torch.from_numpy(y)


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
             group_size: int) -> torch.Tensor:
    """One-shot :func:`lut_gemv_prepared` (prepares the layout each call; tests and one-off products)."""
    return lut_gemv_prepared(x, CpuLutWeights(qweight, scales, in_features, group_size))


# --------------------------------------------------------------------------------------------------------------
# C/AVX2 LUT GEMV (compiled on first use, cached; numba above is the fallback)
# --------------------------------------------------------------------------------------------------------------
# Nibble tables instead of byte tables: per 4 activations 16 partial sums = two 8-float registers, so a lookup
# for 8 rows at once is one in-register permute per half + a blend (vpermps/vblendvps), no memory gather.
# Bit-planes are re-laid out once per linear as 32-bit words holding the same nibble position of 8 rows.
_C_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
void sa_tables(const float *x, float *t, int64_t n_c) {  /* x [n_c*4] -> t [n_c][16] */
  for (int64_t c = 0; c < n_c; c++) {
    const float *xc = x + 4 * c; float *tc = t + 16 * c;
    tc[0] = -(xc[0] + xc[1] + xc[2] + xc[3]);
    for (int j = 0; j < 4; j++) { float s = 2.0f * xc[j]; int h = 1 << j;
      for (int p = 0; p < h; p++) tc[p + h] = tc[p] + s; }
  }
}
/* words [RB][q][C] (nibble r of a word = row 8rb+r), tables [C][16], scales [RB][G][q][8], cpg nibbles/group */
void sa_lut_gemv(const uint32_t *words, const float *tables, const float *scales, float *y,
                 int64_t n_rb, int64_t q, int64_t n_c, int64_t n_g, int64_t cpg) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(15);
  /* small layers stay on one thread: waking a team costs more than the whole product */
  #pragma omp parallel for schedule(static) if (n_rb * q * n_c > (1 << 18))
  for (int64_t rb = 0; rb < n_rb; rb++) {
    __m256 yv = _mm256_setzero_ps();
    const uint32_t *wrb = words + rb * q * n_c;
    const float *srb = scales + rb * n_g * q * 8;
    for (int64_t g = 0; g < n_g; g++) {
      int64_t c0 = g * cpg, c1 = c0 + cpg; if (c1 > n_c) c1 = n_c;
      for (int64_t i = 0; i < q; i++) {
        const uint32_t *w = wrb + i * n_c;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t c = c0;
        for (; c + 1 < c1; c += 2) {
          __m256i v0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[c]), shifts), mask);
          __m256i v1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[c + 1]), shifts), mask);
          const float *t0 = tables + c * 16, *t1 = t0 + 16;
          __m256 l0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t0), v0);
          __m256 h0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t0 + 8), v0);
          __m256 l1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t1), v1);
          __m256 h1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t1 + 8), v1);
          a0 = _mm256_add_ps(a0, _mm256_blendv_ps(l0, h0, _mm256_castsi256_ps(_mm256_slli_epi32(v0, 28))));
          a1 = _mm256_add_ps(a1, _mm256_blendv_ps(l1, h1, _mm256_castsi256_ps(_mm256_slli_epi32(v1, 28))));
        }
        for (; c < c1; c++) {
          __m256i v0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[c]), shifts), mask);
          const float *t0 = tables + c * 16;
          __m256 l0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t0), v0);
          __m256 h0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t0 + 8), v0);
          a0 = _mm256_add_ps(a0, _mm256_blendv_ps(l0, h0, _mm256_castsi256_ps(_mm256_slli_epi32(v0, 28))));
        }
        yv = _mm256_fmadd_ps(_mm256_loadu_ps(srb + (g * q + i) * 8), _mm256_add_ps(a0, a1), yv);
      }
    }
    _mm256_storeu_ps(y + rb * 8, yv);
  }
}
"""
def _declare(lib) -> None:
    import ctypes

    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sa_tables.argtypes = [ptr, ptr, i64]
    lib.sa_lut_gemv.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]


@functools.cache
def c_kernel():
    """The compiled AVX2 kernel library, or None (no x86 AVX2+FMA, no C compiler, or SURGEON_SHIFTADD_KERNEL=numba).

    Built with ``cc -O3 -mavx2 -mfma -fopenmp`` once per machine (:func:`surgeon.kernels.cbuild.compiled_library`);
    a build failure falls back to numba silently (the dispatch says which kernel ran). Resolved once per process:
    the GEMV dispatch asks on every call."""
    import os

    from surgeon.kernels.cbuild import compiled_library, cpu_flags

    if os.environ.get("SURGEON_SHIFTADD_KERNEL", "") == "numba" or not {"avx2", "fma"} <= cpu_flags():
        return None
    return compiled_library("shiftadd_avx2", _C_SOURCE, ["-O3", "-mavx2", "-mfma", "-fopenmp"], _declare)


class CLutWeights:
    """One linear re-laid out for the AVX2 kernel: nibble words of 8 rows ``[RB, q, 2·KB]`` and scales
    ``[RB, G, q, 8]`` (rows padded to a multiple of 8)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int):
        if group_size % 8:
            raise ValueError(f"group_size must be a multiple of 8, got {group_size}")
        q, n_rows, kb_count = qweight.shape
        self.q, self.n_rows, self.in_features, self.group_size = q, n_rows, in_features, group_size
        n_pad = -(-n_rows // 8) * 8
        self.n_rb, self.n_c, self.n_groups = n_pad // 8, 2 * kb_count, scales.shape[-1]
        qw = qweight.cpu().numpy()
        nib = np.empty((q, n_pad, self.n_c), dtype=np.uint32)
        nib[:, n_rows:] = 0
        nib[:, :n_rows, 0::2] = qw & 15
        nib[:, :n_rows, 1::2] = qw >> 4
        nib = nib.reshape(q, self.n_rb, 8, self.n_c) << (4 * np.arange(8, dtype=np.uint32))[None, None, :, None]
        self.words = np.ascontiguousarray(np.bitwise_or.reduce(nib, axis=2).transpose(1, 0, 2))
        sc = np.zeros((q, n_pad, self.n_groups), dtype=np.float32)
        sc[:, :n_rows] = scales.detach().to(torch.float32).cpu().numpy()
        self.scales = np.ascontiguousarray(sc.reshape(q, self.n_rb, 8, self.n_groups).transpose(1, 3, 0, 2))


def c_lut_gemv_prepared(x: torch.Tensor, w: CLutWeights) -> torch.Tensor:
    """``y = x @ Ŵᵀ`` (fp32 [M, N]) with the AVX2 kernel; one pass over the weights per row of x."""
    lib = c_kernel()
    if lib is None:
        raise RuntimeError("the C/AVX2 ShiftAdd kernel is not available on this machine")
    m_count = x.shape[0]
    xp = np.zeros((m_count, w.n_c * 4), dtype=np.float32)
    xp[:, :w.in_features] = x.detach().to(torch.float32).cpu().numpy()
    tables = np.empty((w.n_c, 16), dtype=np.float32)
    yp = np.empty((m_count, w.n_rb * 8), dtype=np.float32)
    for m in range(m_count):
        lib.sa_tables(xp[m].ctypes.data, tables.ctypes.data, w.n_c)
        lib.sa_lut_gemv(w.words.ctypes.data, tables.ctypes.data, w.scales.ctypes.data, yp[m].ctypes.data,
                        w.n_rb, w.q, w.n_c, w.n_groups, w.group_size // 4)
    return torch.from_numpy(yp[:, :w.n_rows].copy())
