"""ShiftAdd LUT GEMV for CUDA in Triton: the same interface as :mod:`surgeon.kernels.shiftadd_cpu`.

``TritonLutWeights(qweight, scales, in_features, group_size)`` prepares one linear once (bit-planes padded to whole
32-bit words and viewed as int32, scales fp32, on the GPU); ``lut_gemv_prepared(x, w)`` computes ``x @ Ŵᵀ`` for
x [M, K], M ≤ 8, returning fp32 [M, N].

Two launches per product:
1. ``_tables_kernel`` builds, per batch row and per 8 activations, the 256 partial sums
   T[p] = Σ_j (bit_j(p) ? +x_j : −x_j) (direct form: 8 fused multiply-adds per entry, all in parallel).
2. ``_lut_gemv_kernel``: each program owns ``BLOCK_N`` rows, reads the bit-planes as packed 32-bit words, splits
   them into 4 byte indices, gathers the partial sums for every batch row at once (each weight word is read once
   for the whole batch) and accumulates α·T in fp32.

Triton has no addressable shared-memory arrays to gather from, so the tables live in a global scratch buffer
(M·K/8·256·4 bytes: 1 MiB for K = 8192 at batch 1) that stays resident in L2 and is read through L1 — the role the
shared-memory tables play in the reference CUDA kernel. Correctness is tested on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BATCH = 8


@triton.jit
def _tables_kernel(x_ptr, t_ptr, KBP, BLOCK_B: tl.constexpr):
    """x: fp32 [M, KBP*8] (zero padded); t: fp32 [M, KBP, 256]. Grid: (cdiv(KBP, BLOCK_B), M)."""
    pid_b = tl.program_id(0)
    m = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < KBP
    p = tl.arange(0, 256)
    acc = tl.zeros((BLOCK_B, 256), dtype=tl.float32)
    for j in tl.static_range(8):
        xj = tl.load(x_ptr + m * KBP * 8 + offs_b * 8 + j, mask=mask_b, other=0.0)
        sign = ((p >> j) & 1).to(tl.float32) * 2.0 - 1.0
        acc += xj[:, None] * sign[None, :]
    offs = m * KBP * 256 + offs_b[:, None] * 256 + p[None, :]
    tl.store(t_ptr + offs, acc, mask=mask_b[:, None])


@triton.jit
def _lut_gemv_kernel(t_ptr, w_ptr, s_ptr, y_ptr, M, N, KW, G, KBP, GB, Q,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """t: fp32 [M, KBP, 256]; w: int32 [Q, N, KW] (KW = KBP/4 words); s: fp32 [Q, N, G]; y: fp32 [M, N]."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(Q):
        for w0 in range(0, KW, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask_w = offs_w < KW
            mask_nw = mask_n[:, None] & mask_w[None, :]
            words = tl.load(w_ptr + (i * N + offs_n[:, None]) * KW + offs_w[None, :], mask=mask_nw, other=0)
            for j in tl.static_range(4):
                byte = (words >> (8 * j)) & 0xFF  # [BLOCK_N, BLOCK_W]
                b = offs_w * 4 + j  # byte position along K/8
                grp = b // GB
                alpha = tl.load(s_ptr + (i * N + offs_n[:, None]) * G + grp[None, :], mask=mask_nw, other=0.0)
                t_off = (offs_m[:, None, None] * KBP + b[None, None, :]) * 256 + byte[None, :, :]
                mask3 = mask_m[:, None, None] & mask_nw[None, :, :]
                vals = tl.load(t_ptr + t_off, mask=mask3, other=0.0)  # [BLOCK_M, BLOCK_N, BLOCK_W]
                acc += tl.sum(vals * alpha[None, :, :], axis=2)
    y_off = offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptr + y_off, acc, mask=mask_m[:, None] & mask_n[None, :])


class TritonLutWeights:
    """One linear prepared for the Triton kernel (done once, e.g. at load)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                 device: str | torch.device = "cuda"):
        if group_size % 8:
            raise ValueError(f"group_size must be a multiple of 8, got {group_size}")
        q, n_rows, kb_count = qweight.shape
        self.q, self.n_rows, self.in_features, self.group_size = q, n_rows, in_features, group_size
        self.gb = group_size // 8
        self.n_groups = scales.shape[-1]
        self.kbp = -(-kb_count // 4) * 4  # whole 32-bit words
        qw = qweight
        if self.kbp != kb_count:
            qw = torch.nn.functional.pad(qw, (0, self.kbp - kb_count))
        # little-endian: byte j of a word is bits 8j..8j+7, i.e. byte position 4w + j
        self.words = qw.contiguous().view(torch.int32).to(device)
        self.scales = scales.detach().to(device=device, dtype=torch.float32).contiguous()
        self.device = torch.device(device)


def lut_gemv_prepared(x: torch.Tensor, w: TritonLutWeights, *, block_n: int = 64,
                      block_w: int = 8) -> torch.Tensor:
    """``y = x @ Ŵᵀ`` (x: [M, K], M ≤ 8) on the GPU; fp32 [M, N] on ``w.device``."""
    m_count = x.shape[0]
    if not 1 <= m_count <= MAX_BATCH:
        raise ValueError(f"the Triton LUT kernel takes 1..{MAX_BATCH} rows, got {m_count}")
    xp = torch.zeros(m_count, w.kbp * 8, device=w.device, dtype=torch.float32)
    xp[:, :w.in_features] = x.to(device=w.device, dtype=torch.float32)
    tables = torch.empty(m_count, w.kbp, 256, device=w.device, dtype=torch.float32)
    block_b = 16
    _tables_kernel[(triton.cdiv(w.kbp, block_b), m_count)](xp, tables, w.kbp, BLOCK_B=block_b)
    y = torch.empty(m_count, w.n_rows, device=w.device, dtype=torch.float32)
    block_m = max(1, triton.next_power_of_2(m_count))
    _lut_gemv_kernel[(triton.cdiv(w.n_rows, block_n),)](
        tables, w.words, w.scales, y, m_count, w.n_rows, w.kbp // 4, w.n_groups, w.kbp, w.gb, w.q,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w)
    return y


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
             group_size: int, device: str | torch.device = "cuda") -> torch.Tensor:
    """One-shot :func:`lut_gemv_prepared`."""
    return lut_gemv_prepared(x, TritonLutWeights(qweight, scales, in_features, group_size, device=device))
