"""Activation-aware ShiftAdd fit (ShiftAddLLM, arXiv 2406.05981; ALGORITHMS.md §7.2): the GPTQ column loop with
BCQ codewords, the sensitivity score and the bit allocation under a budget."""
from __future__ import annotations

import torch
from surgeon.ops.shiftadd.bcq import (
    QuantizedLinear,
    bcq_fit,
    codebook,
    codeword_search,
    fit_row_groups,
    nearest_in,
)

from surgeon.errors import SurgeonError

SCALE_LAYOUTS = ("row", "lat", "acc")  # where α lives and is refitted in the calibrated loop (quantize_gptq)


def act_order_perm(diag: torch.Tensor) -> torch.Tensor:
    """Column order: whole 8-column blocks by decreasing mean Hessian diagonal (LUT bytes stay intact)."""
    k = diag.numel()
    n_blocks = -(-k // 8)
    padded = torch.nn.functional.pad(diag.float(), (0, n_blocks * 8 - k))
    counts = torch.full((n_blocks,), 8.0)
    counts[-1] = k - (n_blocks - 1) * 8
    order = (padded.view(n_blocks, 8).sum(1) / counts).argsort(descending=True, stable=True)
    cols = (order[:, None] * 8 + torch.arange(8)).reshape(-1)
    return cols[cols < k]


FP64_MAX_WIDTH = 8192  # wider Hessians are factored in fp32, as GPTQ's own code does (14336² in fp64 is 1.6 GB)


def _permuted_copy(h: torch.Tensor, perm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """H[perm][:, perm] (or H) as a new ``dtype`` matrix; columns permuted in place 1024 rows at a time."""
    work = h.to(dtype, copy=True) if perm is None else h.index_select(0, perm).to(dtype)
    if perm is not None:
        for r0 in range(0, work.shape[0], 1024):
            work[r0:r0 + 1024] = work[r0:r0 + 1024].index_select(1, perm)
    return work


def _inverse_cholesky_upper(h: torch.Tensor, damping: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """U with UᵀU = (H + damping·mean(diag H)·I)⁻¹ (upper), H permuted by ``perm`` first; fp32 result. Retries
    with more damping.

    Factored in fp64 up to :data:`FP64_MAX_WIDTH` columns, in fp32 beyond. ``h`` is not modified. One working
    matrix besides ``h``: the Cholesky factor, the inverse and U are each computed in place on its
    column-major view (LAPACK's own layout, so torch makes no copy); a 14336-wide MLP-down Hessian needs
    0.8 GB for it instead of 2.5 GB for three separate matrices. The returned U may be that transposed view."""
    dtype = torch.float64 if h.shape[0] <= FP64_MAX_WIDTH else torch.float32
    mean = h.diagonal().to(dtype).mean().clamp_min(1e-12)
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    for extra in (1.0, 10.0, 100.0):
        work = _permuted_copy(h, perm, dtype)  # a failed factorisation leaves it overwritten: start again
        work.diagonal().add_(damping * extra * mean)
        f = work.mT  # column-major view; its upper triangle is work's lower one
        torch.linalg.cholesky_ex(f, upper=True, out=(f, info))  # f = Lᵀ with L Lᵀ = damped H
        if int(info) == 0:
            torch.cholesky_inverse(f, upper=True, out=f)  # f = H⁻¹
            torch.linalg.cholesky_ex(f, upper=True, out=(f, info))  # f = U, UᵀU = H⁻¹
            if int(info) == 0:
                return f.float()
            raise SurgeonError("calibration Hessian: its damped inverse has no Cholesky factor")
        del work, f
    raise SurgeonError("calibration Hessian is not positive definite even with 100× damping")


def sensitivity_score(w: torch.Tensor, h: torch.Tensor | None = None, damping: float = 0.01) -> float:
    """‖M‖_F · std(M)², M = W with column j divided by d_j, d = diag(chol-upper(H⁻¹)) (§7.2; H = I without data)."""
    w = w.float()
    if h is None:
        m = w
    else:
        d = _inverse_cholesky_upper(h.to(w.device), damping).diagonal()
        m = w / d[None, :]
    return float(m.norm() * m.std() ** 2)


def allocate_bits(scores: dict[str, float], numels: dict[str, int], budget: float, low: int,
                  high: int) -> dict[str, int]:
    """Greedy under the numel-weighted average budget: most sensitive layers get ``high`` bits while it fits."""
    total = sum(numels.values())
    bits = {name: low for name in scores}
    spent = low * total
    for name in sorted(scores, key=lambda n: -scores[n]):
        extra = (high - low) * numels[name]
        if spent + extra <= budget * total + 1e-9:
            bits[name] = high
            spent += extra
    return bits


def quantize_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, *, rounds: int = 20,
                  pot_terms: int = 3, damping: float = 0.01, block_size: int = 128, act_order: bool = True,
                  scale_layout: str = "row", device: str = "cpu") -> QuantizedLinear:
    """Activation-aware BCQ (§7.2): the GPTQ column loop with ``h`` = XXᵀ/n.

    Each column takes its nearest codeword under the current α and its error e = (w_j − q_j)/U_jj is pushed onto
    the later columns through U (lazy per block). Where α is (re)fitted by BCQ on the error-updated columns:

    - ``row`` (ours): one α per (row, ``group_size`` columns), fitted at the group's first column;
    - ``lat`` (ShiftAddLLM lat. mode): one α per (8 columns, ``group_size``/8 rows), fitted at each 8-column block;
    - ``acc`` (ShiftAddLLM acc. mode, without its QuIP incoherence): one α per (column, ``group_size`` rows),
      fitted at every column; act-order is then per column (not by 8-column blocks).

    With H = I (no off-diagonal coupling) ``row`` is exactly per-group BCQ. The result stores α per row
    (``lat``: group size 8; ``acc``: group size 1).
    """
    if scale_layout not in SCALE_LAYOUTS:
        raise SurgeonError(f"scale_layout {scale_layout!r}: expected one of {', '.join(SCALE_LAYOUTS)}")
    n, k = w.shape
    w = w.to(device=device, dtype=torch.float32).clone()
    h = h.to(device=device, dtype=torch.float32)
    diag = h.diagonal().clone()
    dead = diag == 0
    if bool(dead.any()):  # a column no token ever excites: H_jj = 1, W_j = 0 (as GPTQ)
        h = h.clone()
        h[dead, dead] = 1.0
        diag[dead] = 1.0
        w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = (diag.cpu().argsort(descending=True, stable=True) if scale_layout == "acc"
                else act_order_perm(diag.cpu())).to(device)
        w = w[:, perm]
    u = _inverse_cholesky_upper(h, damping, perm)
    del h
    block = -(-max(block_size, group_size) // group_size) * group_size  # whole groups per block
    refit_every, stored_gs, rows_per_alpha = {"row": (group_size, group_size, 1), "lat": (8, 8, group_size // 8),
                                              "acc": (1, 1, group_size)}[scale_layout]
    alpha = torch.empty(bits, n, -(-k // stored_gs), device=device)
    codes = torch.empty(n, k, dtype=torch.uint8, device=device)  # index of the chosen codeword (2^q <= 256)
    book = codebook(bits, torch.device(device))  # [2^q, q]
    search = None  # sorted codeword midpoints and their codebook indices under the current α
    for b1 in range(0, k, block):
        b2 = min(k, b1 + block)
        w1 = w[:, b1:b2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[b1:b2, b1:b2].contiguous()
        for j in range(b2 - b1):
            col = b1 + j
            if col % refit_every == 0:
                cols = w1[:, j:j + refit_every]
                if scale_layout == "row":
                    cur = bcq_fit(cols, bits, rounds=rounds, pot_terms=pot_terms)[0]
                else:
                    cur = fit_row_groups(cols, rows_per_alpha, bits, rounds=rounds, pot_terms=pot_terms)
                    cur = cur.repeat_interleave(rows_per_alpha, dim=0)[:n]
                alpha[:, :, col // stored_gs] = cur.T
                values = cur @ book.T
                search = codeword_search(cur)
            wj = w1[:, j]
            idx = nearest_in(wj[:, None], *search)
            codes[:, col] = idx[:, 0]
            e = (wj - values.gather(1, idx)[:, 0]) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        w[:, b2:].addmm_(err1, u[b1:b2, b2:], alpha=-1.0)  # in place: no [N, K] temporary
    del u, w
    return QuantizedLinear.from_codes(codes, alpha, stored_gs, pot_terms, perm)  # bit i of an index: plane i


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """‖(W − Ŵ)X‖/‖WX‖ computed from H = XXᵀ/n: sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)), ``rows_per_chunk`` rows of W at a
    time (whole-matrix E, E·H and W·H are 0.7 GB of temporaries for a 14336 × 4096 linear)."""
    h = h.float()
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        wr = w[r0:r0 + rows_per_chunk].float()
        e = wr - w_hat[r0:r0 + rows_per_chunk].float()
        num += (e @ h).mul_(e).sum(dtype=torch.float64).cpu()
        den += (wr @ h).mul_(wr).sum(dtype=torch.float64).cpu()
    return float((num / den.clamp_min(1e-300)).sqrt())
