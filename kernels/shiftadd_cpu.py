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
    q, n, _ = qweight.shape
    signs = unpack_signs(qweight, in_features)  # [q, N, K]
    alpha = scales.float().repeat_interleave(group_size, dim=-1)[..., :in_features]  # [q, N, K]
    return (signs * alpha).sum(0)


def lut_gemv_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                       group_size: int) -> torch.Tensor:
    """Plain-torch reference: ``x @ dequantize(...)ᵀ`` in fp64 (``x``: [M, K])."""
    w = dequantize(qweight, scales, in_features, group_size).double()
    return (x.double() @ w.T).float()


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
