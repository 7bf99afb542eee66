"""ShiftAdd: each block linear becomes q binary sign matrices with power-of-two(-sum) scales (ShiftAddLLM,
You et al., NeurIPS 2024, arXiv 2406.05981; ALGORITHMS.md §7).

W ≈ Σ_{i=1..q} α_i ⊙ B_i, B_i ∈ {−1,+1}^{N×K}, α per (plane, row, group of ``group_size`` input columns), each α a
sum of ``pot_terms`` signed powers of two (APoT, arXiv 1909.13144), so x·W is table lookups, shifts and adds.

- activation-aware (the default; ``data`` = a text file or ``model:N``, self-sampled ``model:32`` when not given):
  the GPTQ column loop (arXiv 2210.17323) with the calibration Hessian H = XXᵀ/n, BCQ fit of α at each group start
  (``scale_layout`` ``lat``/``acc``: re-fitted inside the loop as in the authors' code), then per column the nearest
  codeword and the error fed forward through chol(H⁻¹) — the objective is the layer output error ‖(W − Ŵ)X‖.
- weight-only (``weight_only``): per-group BCQ with alternating rounds (arXiv 1802.00150); lazy, one tensor at a
  time.
- ``bits_budget``: per-layer bits (bits−1 or bits) from the sensitivity score ‖M‖_F·std(M)², M = W / diag(U).
- output: the packed format (``X.qweight`` bit-planes, ``X.pot_exp``/``X.pot_sign`` or ``X.scales``, ``X.perm``)
  read by :func:`load_shiftadd`, or a dense checkpoint with ``materialize``.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from surgeon.kernels.shiftadd import PackedLinear
from surgeon.kernels.shiftadd_cpu import pack_signs

from surgeon.errors import SurgeonError
from surgeon.registry import register

if TYPE_CHECKING:
    from surgeon.context import Context
    from surgeon.graph import Graph

LAYOUT_VERSION = 1
QUANT_METHOD = "shiftadd"
ABSENT_EXP = -128  # pot_exp value of an unused APoT term
FP16_SPAN = 10  # APoT terms lie within 2^-10 of the leading one, so every scale is exact in fp16
SCALE_LAYOUTS = ("row", "lat", "acc")  # where α lives and is refitted in the calibrated loop (quantize_gptq)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int = Field(3, ge=1, le=8, description="Binary planes per weight (q). With --bits-budget: the high "
                                                 "choice; layers get bits-1 or bits.")
    group_size: int = Field(128, ge=8, description="Input columns sharing one scale per row and plane "
                                                   "(a multiple of 8, so a LUT byte never spans two groups).")
    pot_terms: int = Field(3, ge=0, le=3, description="Power-of-two terms per scale: 1 = pure shift, 3 = "
                                                      "ShiftAddLLM's default; 0 = plain fp16 scales (BCQ).")
    rounds: int = Field(20, ge=0, le=1000, description="Alternating BCQ rounds (least-squares scales, then "
                                                       "nearest codewords) per group.")
    data: str = Field("model:32", description="Calibration text for the activation-aware fit (the paper's "
                                              "method): a text file, or `model`/`model:N` for N sequences "
                                              "sampled from the model itself.")
    weight_only: bool = Field(False, description="Skip calibration: per-group BCQ of the weights alone (no forward "
                                                 "passes, streams one linear at a time; far worse perplexity).")
    scale_layout: Literal["row", "lat", "acc"] = Field(
        "row", description="Where α lives and is refitted in the calibrated loop: `row` = per (row, group_size "
                           "columns) at each group start (packed LUT format); `lat` / `acc` = ShiftAddLLM's lat. "
                           "mode (per 8 columns × group_size/8 rows, refitted every 8 columns) / acc. mode (per "
                           "column × group_size rows, refitted every column; no QuIP) — dense output only.")
    seqlen: int = Field(256, ge=8, description="Calibration window length in tokens.")
    max_windows: int = Field(32, ge=1, description="Number of calibration windows.")
    damping: float = Field(0.01, gt=0, lt=1, description="Hessian damping: + damping·mean(diag H)·I.")
    block_size: int = Field(128, ge=8, description="GPTQ lazy-update block (columns; rounded up to whole groups).")
    act_order: bool = Field(True, description="Quantise 8-column blocks in order of decreasing Hessian diagonal "
                                              "(stores X.perm); calibrated fits only.")
    bits_budget: float | None = Field(None, description="Average bits per weight (numel-weighted) between "
                                                        "bits-1 and bits; layers are ranked by sensitivity.")
    materialize: bool = Field(False, description="Write dense Ŵ = Σα·B in the original dtype (loads anywhere) "
                                                 "instead of the packed format.")

    @field_validator("group_size")
    @classmethod
    def _whole_bytes(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"group_size {v}: expected a multiple of 8")
        return v

    @model_validator(mode="after")
    def _calibration_choice(self) -> Params:
        if self.weight_only and "data" in self.model_fields_set:
            raise ValueError("weight_only and data exclude each other: weight-only BCQ uses no calibration text")
        if self.scale_layout != "row" and (self.weight_only or not self.materialize):
            raise ValueError(f"scale_layout {self.scale_layout!r}: only for the calibrated fit with materialize "
                             "(the packed format stores α per (row, group); use scale_layout row)")
        return self

    @model_validator(mode="after")
    def _budget_in_range(self) -> Params:
        if self.bits_budget is not None:
            lo, hi = self.bits - 1, self.bits
            if lo < 1 or not lo <= self.bits_budget <= hi:
                raise ValueError(f"bits_budget {self.bits_budget}: expected a value in [{lo}, {hi}] "
                                 f"(layers get {lo} or {hi} bits with --bits {self.bits}; needs bits >= 2)")
        return self


# ==============================================================================================================
# scale rounding: APoT (α ≈ ±2^k1 ± 2^k2 ± 2^k3) or fp16
# ==============================================================================================================
def pot_round(alpha: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy APoT rounding (§7.1): k = round(log2|residual|), term = sign·2^k, repeat ``terms`` times.

    Terms below 2^(k1−10) are dropped so the value is exact in fp16. Returns (values fp32, exponents int8
    [..., terms] with ``ABSENT_EXP`` for unused terms, negative-term bits uint8 [...]).
    """
    exps = torch.full((*alpha.shape, terms), ABSENT_EXP, dtype=torch.int8, device=alpha.device)
    neg = torch.zeros(alpha.shape, dtype=torch.uint8, device=alpha.device)
    value = _pot_greedy(alpha, terms, exps, neg)
    return value, exps, neg


def _pot_greedy(alpha: torch.Tensor, terms: int, exps: torch.Tensor | None = None, neg: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The greedy APoT value of :func:`pot_round` (fp32); fills ``exps``/``neg`` when given."""
    resid = alpha.double().clone()
    value = torch.zeros_like(resid)
    lead = None
    for t in range(terms):
        nz = resid != 0
        k = torch.round(torch.log2(resid.abs().clamp_min(1e-300))).clamp(-100, 100)
        if lead is None:
            lead = k
            use = nz
        else:
            use = nz & (k >= lead - FP16_SPAN)
        term = torch.where(use, torch.sign(resid) * torch.exp2(k), 0.0)
        value += term
        resid -= term
        if exps is not None and neg is not None:
            exps[..., t] = torch.where(use, k, ABSENT_EXP).to(torch.int8)
            neg |= ((term < 0).to(torch.uint8) << t)
    return value.float()


def pot_decode(exps: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pot_round`: fp32 values from int8 exponents [..., t] and sign bits [...]."""
    terms = exps.shape[-1]
    e = exps.to(torch.float64)
    present = exps != ABSENT_EXP
    shifts = torch.arange(terms, device=neg.device)
    signs = 1.0 - 2.0 * ((neg.unsqueeze(-1).to(torch.int64) >> shifts) & 1).to(torch.float64)
    return torch.where(present, signs * torch.exp2(e), torch.zeros_like(e)).sum(-1).float()


def pot_decompose(values: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponents and sign bits of values that are already sums of ≤ ``terms`` signed powers of two.

    Re-running the greedy rounding on a rounded value may pick the other neighbouring power first, so each
    step tries both floor and ceil of log2|residual| (2^terms paths) and keeps the first path that is exact.
    """
    v = values.double()
    exps = torch.full((*v.shape, terms), ABSENT_EXP, dtype=torch.int8, device=v.device)
    neg = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    done = v == 0
    for path in range(2 ** terms):
        resid = v.clone()
        e = torch.full_like(exps, ABSENT_EXP)
        ng = torch.zeros_like(neg)
        for t in range(terms):
            nz = resid != 0
            k = torch.floor(torch.log2(resid.abs().clamp_min(1e-300))) + ((path >> t) & 1)
            term = torch.where(nz, torch.sign(resid) * torch.exp2(k), torch.zeros_like(resid))
            e[..., t] = torch.where(nz, k.clamp(-127, 127), torch.full_like(k, ABSENT_EXP)).to(torch.int8)
            ng |= ((term < 0).to(torch.uint8) << t)
            resid = resid - term
        hit = (resid == 0) & ~done
        exps[hit] = e[hit]
        neg[hit] = ng[hit]
        done |= hit
        if bool(done.all()):
            break
    if not bool(done.all()):
        raise SurgeonError(f"internal: a scale is not a sum of {terms} powers of two")
    return exps, neg


def round_scales(alpha: torch.Tensor, pot_terms: int) -> torch.Tensor:
    """α as it will be stored: APoT values (``pot_terms`` > 0) or fp16-rounded values."""
    if pot_terms > 0:
        return _pot_greedy(alpha, pot_terms)
    return alpha.half().float()


# ==============================================================================================================
# BCQ: greedy init + alternating least squares / nearest codeword (arXiv 1802.00150)
# ==============================================================================================================
@functools.lru_cache(maxsize=32)
def _codebook(bits: int, device: torch.device) -> torch.Tensor:
    """All 2^q sign combinations, [2^q, q] of ±1 (cached: the BCQ loop asks for it thousands of times)."""
    idx = torch.arange(2 ** bits, device=device)
    return (((idx[:, None] >> torch.arange(bits, device=device)) & 1) * 2 - 1).float()


def _codeword_values(alpha: torch.Tensor) -> torch.Tensor:
    """Value of every codeword Σ_i α_i b_i per row: [R, 2^q] in :func:`_codebook` order."""
    return alpha @ _codebook(alpha.shape[1], alpha.device).T


def _codeword_search(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted codeword values of each row [R, 2^q − 1] and the codebook index of each sorted
    value [R, 2^q], for :func:`_nearest_in`."""
    values, order = _codeword_values(alpha).sort(dim=1)
    return (0.5 * (values[:, 1:] + values[:, :-1])).contiguous(), order


def _nearest_in(w: torch.Tensor, mids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Codebook index of the codeword nearest to each element of ``w`` [R, C] by binary search on the midpoints; a
    weight exactly on a midpoint takes the larger codeword (as the reference's find_B_torch)."""
    return order.gather(1, torch.searchsorted(mids, w.contiguous(), right=True))


def nearest_code(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Index (into :func:`_codebook`) of the codeword nearest to each element of ``w`` [R, C]; int64 [R, C].

    The 2^q values of a row are sorted once and each weight is placed by binary search on the midpoints
    between neighbours, O(R·C·q) instead of comparing against all 2^q codewords.
    """
    return _nearest_in(w, *_codeword_search(alpha))


def nearest_codeword(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Signs [R, C, q] of the codeword Σ_i α_i b_i nearest to each element of ``w`` [R, C] given α [R, q]."""
    return _codebook(alpha.shape[1], w.device)[nearest_code(w, alpha)]


def _code_error(w: torch.Tensor, alpha: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Squared error per row of the codes' reconstruction."""
    return ((w - _codeword_values(alpha).gather(1, codes)) ** 2).sum(1)


def _least_squares_scales(w: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """α = (BᵀB)⁻¹Bᵀw per row, with BᵀB and Bᵀw accumulated per codeword (counts and sums of w), so the
    [R, C, q] sign tensor is never formed."""
    book = _codebook(bits, w.device)
    m = book.shape[0]
    counts = torch.zeros(w.shape[0], m, device=w.device).scatter_add_(1, codes, torch.ones_like(w))
    sums = torch.zeros(w.shape[0], m, device=w.device).scatter_add_(1, codes, w)
    btb = torch.einsum("rm,mi,mj->rij", counts, book, book)  # [R, q, q]
    btw = sums @ book  # [R, q]
    eye = torch.eye(bits, device=w.device)
    ridge = 1e-6 * btb.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    return torch.linalg.solve(btb + ridge, btw.unsqueeze(-1)).squeeze(-1)


def bcq_fit(w: torch.Tensor, bits: int, *, rounds: int = 20, pot_terms: int = 3
            ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Fit each row of ``w`` [R, C] as Σ_i α_i b_i (α [R, q] stored-rounded, signs [R, C, q]).

    Greedy: b_i = sign(r), α_i = mean|r|, r −= α_i b_i. Rounds: (a) B fixed, α = (BᵀB)⁻¹Bᵀw per row, rounded
    (APoT / fp16) and re-sorted by |α|; (b) α fixed, every element takes its nearest codeword. Returns the best
    (α, B) seen and the squared error after the init and after each round (non-increasing without rounding).
    """
    w = w.float()
    resid = w.clone()
    alphas = []
    for _ in range(bits):
        a = resid.abs().mean(1)
        alphas.append(a)
        resid -= a[:, None] * torch.where(resid >= 0, 1.0, -1.0)
    alpha = round_scales(torch.stack(alphas, 1), pot_terms)
    codes = nearest_code(w, alpha)
    best_alpha, best_codes, best_err = alpha, codes, _code_error(w, alpha, codes)
    history = [float(best_err.sum())]
    for _ in range(rounds):
        alpha = round_scales(_least_squares_scales(w, best_codes, bits), pot_terms)
        alpha = alpha.gather(1, alpha.abs().argsort(dim=1, descending=True))
        codes = nearest_code(w, alpha)
        err = _code_error(w, alpha, codes)
        better = err < best_err
        best_alpha = torch.where(better[:, None], alpha, best_alpha)
        best_codes = torch.where(better[:, None], codes, best_codes)
        best_err = torch.minimum(err, best_err)
        history.append(float(best_err.sum()))
    return best_alpha, _codebook(bits, w.device)[best_codes], history


# ==============================================================================================================
# quantised linear: result container, weight-only and activation-aware fits
# ==============================================================================================================
class QuantizedLinear:
    """The fitted form of one linear (Linear orientation, packed column order)."""

    def __init__(self, signs: torch.Tensor, alpha: torch.Tensor, group_size: int, pot_terms: int,
                 perm: torch.Tensor | None = None):
        # signs: [q, N, K] ±1 (or bool); alpha: [q, N, G] stored-rounded values
        self.in_features = signs.shape[-1]
        self.qweight = pack_signs(signs)
        self.alpha = alpha.float().contiguous()
        self.group_size, self.pot_terms = group_size, pot_terms
        self.perm = None if perm is None else perm.to(torch.int32)

    @property
    def bits(self) -> int:
        return self.qweight.shape[0]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The packed tensors of this linear under ``prefix`` (the module name)."""
        out = {f"{prefix}.qweight": self.qweight}
        if self.pot_terms > 0:
            exps, neg = pot_decompose(self.alpha, self.pot_terms)
            out[f"{prefix}.pot_exp"] = exps
            out[f"{prefix}.pot_sign"] = neg
        else:
            out[f"{prefix}.scales"] = self.alpha.half()
        if self.perm is not None:
            out[f"{prefix}.perm"] = self.perm
        return out

    def packed(self) -> PackedLinear:
        return PackedLinear(self.qweight, self.alpha, self.in_features, self.group_size,
                            None if self.perm is None else self.perm.long())

    def dense(self) -> torch.Tensor:
        """Ŵ [N, K] in the original column order."""
        return self.packed().dense()


def quantize_weight_only(w: torch.Tensor, bits: int, group_size: int, *, rounds: int = 20,
                         pot_terms: int = 3, device: str = "cpu") -> QuantizedLinear:
    """Per-group BCQ of ``w`` [N, K] (Linear orientation); all full groups are fitted in one batch."""
    n, k = w.shape
    w = w.to(device=device, dtype=torch.float32)
    n_groups = -(-k // group_size)
    signs = torch.empty(bits, n, k, device=device)
    alpha = torch.empty(bits, n, n_groups, device=device)
    full = k // group_size
    if full:
        rows = w[:, :full * group_size].reshape(n * full, group_size)
        a, s, _ = bcq_fit(rows, bits, rounds=rounds, pot_terms=pot_terms)
        alpha[:, :, :full] = a.reshape(n, full, bits).permute(2, 0, 1)
        signs[:, :, :full * group_size] = s.reshape(n, full, group_size, bits).permute(3, 0, 1, 2).reshape(
            bits, n, full * group_size)
    if full < n_groups:  # a last, shorter group
        a, s, _ = bcq_fit(w[:, full * group_size:], bits, rounds=rounds, pot_terms=pot_terms)
        alpha[:, :, full] = a.T
        signs[:, :, full * group_size:] = s.permute(2, 0, 1)
    return QuantizedLinear(signs.cpu(), alpha.cpu(), group_size, pot_terms)


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


def _inverse_cholesky_upper(h: torch.Tensor, damping: float) -> torch.Tensor:
    """U with UᵀU = (H + damping·mean(diag H)·I)⁻¹ (upper), in fp64 then fp32; retries with more damping."""
    h = h.double()
    mean = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for extra in (1.0, 10.0, 100.0):
        l, info = torch.linalg.cholesky_ex(h + damping * extra * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.float()
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


def _fit_row_groups(x: torch.Tensor, rows_per_group: int, bits: int, *, rounds: int, pot_terms: int
                    ) -> torch.Tensor:
    """One α-vector per group of ``rows_per_group`` consecutive rows of ``x`` [N, c], fitted by BCQ on the group's
    rows·c weights (a shorter last group when N is not a multiple); [⌈N/rows⌉, q]."""
    n = x.shape[0]
    full = n // rows_per_group
    parts = []
    if full:
        parts.append(bcq_fit(x[:full * rows_per_group].reshape(full, -1), bits, rounds=rounds,
                             pot_terms=pot_terms)[0])
    if full * rows_per_group < n:
        parts.append(bcq_fit(x[full * rows_per_group:].reshape(1, -1), bits, rounds=rounds, pot_terms=pot_terms)[0])
    return torch.cat(parts)


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
    h = h.to(device=device, dtype=torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        diag = h.diagonal().cpu()
        perm = (diag.argsort(descending=True, stable=True) if scale_layout == "acc" else act_order_perm(diag)
                ).to(device)
        w = w[:, perm]
        h = h[perm][:, perm]
    u = _inverse_cholesky_upper(h, damping)
    block = -(-max(block_size, group_size) // group_size) * group_size  # whole groups per block
    refit_every, stored_gs, rows_per_alpha = {"row": (group_size, group_size, 1), "lat": (8, 8, group_size // 8),
                                              "acc": (1, 1, group_size)}[scale_layout]
    alpha = torch.empty(bits, n, -(-k // stored_gs), device=device)
    codes = torch.empty(n, k, dtype=torch.long, device=device)  # index of the chosen codeword per weight
    book = _codebook(bits, torch.device(device))  # [2^q, q]
    search = None  # sorted codeword midpoints and their codebook indices under the current α
    for b1 in range(0, k, block):
        b2 = min(k, b1 + block)
        w1 = w[:, b1:b2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[b1:b2, b1:b2]
        for j in range(b2 - b1):
            col = b1 + j
            if col % refit_every == 0:
                cols = w1[:, j:j + refit_every]
                if scale_layout == "row":
                    cur = bcq_fit(cols, bits, rounds=rounds, pot_terms=pot_terms)[0]
                else:
                    cur = _fit_row_groups(cols, rows_per_alpha, bits, rounds=rounds, pot_terms=pot_terms)
                    cur = cur.repeat_interleave(rows_per_alpha, dim=0)[:n]
                alpha[:, :, col // stored_gs] = cur.T
                values = cur @ book.T
                search = _codeword_search(cur)
            wj = w1[:, j]
            idx = _nearest_in(wj[:, None], *search)
            codes[:, col] = idx[:, 0]
            e = (wj - values.gather(1, idx)[:, 0]) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        w[:, b2:] -= err1 @ u[b1:b2, b2:]
    signs = book[codes].permute(2, 0, 1)  # [q, N, K]
    return QuantizedLinear(signs.cpu(), alpha.cpu(), stored_gs, pot_terms, None if perm is None else perm.cpu())


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖/‖WX‖ computed from H = XXᵀ/n: sqrt(tr(E H Eᵀ)/tr(W H Wᵀ))."""
    h = h.double()
    e = (w.double() - w_hat.double())
    num = (e @ h * e).sum()
    den = (w.double() @ h * w.double()).sum().clamp_min(1e-300)
    return float((num / den).sqrt())


# ==============================================================================================================
# graph wiring
# ==============================================================================================================
def _module_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise SurgeonError(f"{weight_name}: expected a linear weight ending in '.weight'")
    return weight_name[: -len(".weight")]


def block_linear_names(graph: Graph) -> list[tuple[str, bool]]:
    """(weight name, transposed) of every block linear, from :func:`surgeon.arch.roles_for`."""
    from surgeon.arch import roles_for

    r = roles_for(graph.config, graph.names())
    out: list[tuple[str, bool]] = []
    for i in range(r.n_layers):
        role_of = {}
        for role in r.roles():
            if r.has(i, role):
                role_of.setdefault(r.tensor(i, role), role)
        for name in r.block_linears(i):
            node = graph[name]
            if len(node.shape) != 2 or not node.dtype.is_floating_point:
                continue
            out.append((name, r.transposed(role_of.get(name, ""))))
    if not out:
        raise SurgeonError("shiftadd: the model has no block linear layers to quantise")
    return out


def _blob_layout(q: int, n: int, k: int, group_size: int, pot_terms: int) -> list[tuple[str, tuple, torch.dtype]]:
    g = -(-k // group_size)
    parts = [("qweight", (q, n, -(-k // 8)), torch.uint8)]
    if pot_terms > 0:
        parts += [("pot_exp", (q, n, g, pot_terms), torch.int8), ("pot_sign", (q, n, g), torch.uint8)]
    else:
        parts += [("scales", (q, n, g), torch.float16)]
    return parts


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * (torch.finfo(dtype).bits // 8 if dtype.is_floating_point else
                               torch.iinfo(dtype).bits // 8)


def _lazy_packed_nodes(graph: Graph, name: str, transposed: bool, bits: int, params: Params, device: str
                       ) -> dict[str, Any]:
    """Nodes for one linear's packed tensors, all computed from one shared fit node (a uint8 blob).

    The writer evaluates every output with one executor, which memoises the blob while its consumers remain, so
    the fit runs once per linear and only one linear is in memory at a time.
    """
    from surgeon.graph import Apply

    src = graph[name]
    n, k = (src.shape[1], src.shape[0]) if transposed else src.shape
    layout = _blob_layout(bits, n, k, params.group_size, params.pot_terms)
    total = sum(_nbytes(s, d) for _, s, d in layout)

    def fit(w: torch.Tensor) -> torch.Tensor:
        w = w.T if transposed else w
        ql = quantize_weight_only(w, bits, params.group_size, rounds=params.rounds, pot_terms=params.pot_terms,
                                  device=device)
        tensors = ql.tensors("x")
        return torch.cat([tensors[f"x.{key}"].contiguous().view(torch.uint8).reshape(-1) for key, _, _ in layout])

    blob = Apply(fit, [src], label="shiftadd-fit", shape=(total,), dtype=torch.uint8)
    prefix = _module_name(name)
    nodes: dict[str, Any] = {}
    offset = 0
    for key, shape, dtype in layout:
        size = _nbytes(shape, dtype)

        def part(b: torch.Tensor, o: int = offset, s: int = size, sh: tuple = shape, dt: torch.dtype = dtype
                 ) -> torch.Tensor:
            return b[o:o + s].clone().view(dt).reshape(sh)

        nodes[f"{prefix}.{key}"] = Apply(part, [blob], label=f"shiftadd-{key}", shape=shape, dtype=dtype)
        offset += size
    return nodes


def _lazy_dense_node(graph: Graph, name: str, transposed: bool, bits: int, params: Params, device: str):
    from surgeon.graph import Apply

    def fit(w: torch.Tensor) -> torch.Tensor:
        w2 = w.float().T if transposed else w.float()
        ql = quantize_weight_only(w2, bits, params.group_size, rounds=params.rounds, pot_terms=params.pot_terms,
                                  device=device)
        d = ql.dense()
        return d.T if transposed else d

    return Apply(fit, [graph[name]], label="shiftadd-dense")


def _quant_config(params: Params, bits_of: dict[str, int], transposed: dict[str, bool],
                  in_features: dict[str, int], act_order: bool) -> dict[str, Any]:
    modules = {_module_name(n): {"bits": b, "in_features": in_features[n],
                                 **({"transposed": True} if transposed.get(n) else {})}
               for n, b in bits_of.items()}
    return {"quant_method": QUANT_METHOD, "layout_version": LAYOUT_VERSION,
            "bits": params.bits if params.bits_budget is None else None, "bits_budget": params.bits_budget,
            "group_size": params.group_size, "pot_terms": params.pot_terms,
            "scale_format": "pot" if params.pot_terms > 0 else "fp16", "act_order": act_order,
            "calibrated": not params.weight_only, "modules": modules}


def _packed_bytes(bits_of: dict[str, int], graph: Graph, transposed: dict[str, bool], params: Params) -> int:
    total = 0
    for name, b in bits_of.items():
        shp = graph[name].shape
        n, k = (shp[1], shp[0]) if transposed[name] else shp
        total += sum(_nbytes(s, d) for _, s, d in _blob_layout(b, n, k, params.group_size, params.pot_terms))
    return total


@register("shiftadd", Params)
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """ShiftAdd reparameterisation of every block linear (activation-aware by default, or lazy weight-only)."""
    graph = graph.copy()
    linears = block_linear_names(graph)
    transposed = dict(linears)
    in_features = {n: graph[n].shape[0 if tr else 1] for n, tr in linears}
    if not params.weight_only:
        return _apply_calibrated(graph, params, ctx, linears, in_features)
    if params.bits_budget is not None:
        scores, numels = {}, {}
        for name, value in ctx.progress(graph.values([n for n, _ in linears]), total=len(linears),
                                        description="shiftadd: sensitivity"):
            w = value.float().T if transposed[name] else value.float()
            scores[name] = sensitivity_score(w)
            numels[name] = w.numel()
        bits_of = allocate_bits(scores, numels, params.bits_budget, params.bits - 1, params.bits)
    else:
        bits_of = {n: params.bits for n, _ in linears}
    for name, tr in linears:
        if params.materialize:
            graph.nodes[name] = _lazy_dense_node(graph, name, tr, bits_of[name], params, ctx.device)
        else:
            new = _lazy_packed_nodes(graph, name, tr, bits_of[name], params, ctx.device)
            _replace(graph, name, new)
    _finish(graph, params, ctx, bits_of, transposed, in_features, act_order=False)
    return graph


def _replace(graph: Graph, weight_name: str, new: dict[str, Any]) -> None:
    """Put ``new`` nodes where ``weight_name`` was (keeps the model's tensor order), dropping the weight."""
    nodes = {}
    for key, node in graph.nodes.items():
        if key == weight_name:
            nodes.update(new)
        else:
            nodes[key] = node
    graph.nodes = nodes


def _finish(graph: Graph, params: Params, ctx: Context, bits_of: dict[str, int], transposed: dict[str, bool],
            in_features: dict[str, int], *, act_order: bool, extra: dict[str, Any] | None = None) -> None:
    if not params.materialize:
        graph.config["quantization_config"] = _quant_config(params, bits_of, transposed, in_features, act_order)
        graph.tags.append("shiftadd")
    numel = {}
    for name in bits_of:
        qn = graph.nodes.get(f"{_module_name(name)}.qweight")
        numel[name] = qn.shape[1] * in_features[name] if qn is not None else math.prod(graph[name].shape)
    avg_bits = sum(bits_of[n] * numel[n] for n in bits_of) / max(1, sum(numel.values()))
    report: dict[str, Any] = {"linears": len(bits_of), "average_bits": round(avg_bits, 4),
                              "bits_per_layer": {_module_name(n): b for n, b in bits_of.items()},
                              "group_size": params.group_size, "pot_terms": params.pot_terms,
                              "format": "dense (materialized)" if params.materialize else "packed"}
    if extra:
        report.update(extra)
    ctx.report(**report)
    if params.bits_budget is not None:
        counts = {b: sum(1 for v in bits_of.values() if v == b) for b in sorted(set(bits_of.values()))}
        ctx.log(f"shiftadd: bit allocation {counts} (average {avg_bits:.3f} bits/weight)")


# --------------------------------------------------------------------------------------------------------------
# activation-aware path: layer-by-layer calibration forward passes
# --------------------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def _layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, tokens: torch.Tensor, batch: int,
                  device: torch.device) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each calibration batch hands to the first decoder layer."""
    captured: list[tuple[tuple, dict]] = []

    def grab(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch):
                try:
                    model(input_ids=tokens[i:i + batch].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: torch.nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = layer(*args, **kwargs)
            hidden = y[0] if isinstance(y, (tuple, list)) else y
            out.append(((hidden, *args[1:]) if args else (), kwargs if args else {**kwargs,
                                                                                  "hidden_states": hidden}))
    return out


def _collect_hessians(layer: torch.nn.Module, modules: dict[str, torch.nn.Module], transposed: dict[str, bool],
                      inputs: list[tuple[tuple, dict]], device: torch.device) -> dict[str, torch.Tensor]:
    sums: dict[str, list] = {}

    def hook_for(name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float32)
            acc = sums.setdefault(name, [torch.zeros(x.shape[1], x.shape[1], device=device), 0])
            acc[0].addmm_(x.T, x)
            acc[1] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in sums]
    if missing:
        raise SurgeonError(f"shiftadd: linear {missing[0]} saw no calibration input")
    return {n: s / max(1, c) for n, (s, c) in sums.items()}


def _weight_of(module: torch.nn.Module, transposed: bool) -> torch.Tensor:
    w = module.weight.detach().float()
    return w.T if transposed else w


def _apply_calibrated(graph: Graph, params: Params, ctx: Context, linears: list[tuple[str, bool]],
                      in_features: dict[str, int]) -> Graph:
    from surgeon.arch import roles_for
    from surgeon.graph import Const

    transposed = dict(linears)
    r = roles_for(graph.config, graph.names())
    dev = torch.device(ctx.device)
    model = ctx.module(graph, dtype="float32")
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.max_windows)
    to_module = {g: p for p, g in model._surgeon_names.items()}  # graph name -> module parameter name
    layer_of: dict[str, int] = {}
    modules: dict[str, torch.nn.Module] = {}
    for name, _ in linears:
        pname = to_module.get(name)
        if pname is None:
            raise SurgeonError(f"shiftadd: {name} is not a parameter of the materialised model")
        modules[name] = model.get_submodule(pname.rsplit(".", 1)[0])
    for i in range(r.n_layers):
        for name in r.block_linears(i):
            layer_of[name] = i
    layer_mods = [_find_layer(model, modules, i, layer_of) for i in range(r.n_layers)]
    batch = 8
    inputs = _layer_inputs(model, layer_mods[0], tokens, batch, dev)
    ctx.log(f"shiftadd: calibrating on {tokens.shape[0]}×{tokens.shape[1]} tokens, {r.n_layers} layers")

    bits_of = {n: params.bits for n, _ in linears}
    if params.bits_budget is not None:
        scores, numels = {}, {}
        cur = inputs
        for i in ctx.progress(range(r.n_layers), total=r.n_layers, description="shiftadd: sensitivity"):
            mods = {n: m for n, m in modules.items() if layer_of.get(n) == i}
            hs = _collect_hessians(layer_mods[i], mods, transposed, cur, dev)
            for n, m in mods.items():
                w = _weight_of(m, transposed[n]).to(dev)
                scores[n] = sensitivity_score(w, hs[n], params.damping)
                numels[n] = w.numel()
            cur = _run_layer(layer_mods[i], cur)
        del cur
        bits_of = allocate_bits(scores, numels, params.bits_budget, params.bits - 1, params.bits)

    new_nodes: dict[str, dict[str, Any]] = {}
    rel_w, rel_out = {}, {}
    cur = inputs
    for i in ctx.progress(range(r.n_layers), total=r.n_layers, description="shiftadd: GPTQ-BCQ"):
        mods = {n: m for n, m in modules.items() if layer_of.get(n) == i}
        hs = _collect_hessians(layer_mods[i], mods, transposed, cur, dev)
        for n, m in mods.items():
            w = _weight_of(m, transposed[n])
            ql = quantize_gptq(w, hs[n], bits_of[n], params.group_size, rounds=params.rounds,
                               pot_terms=params.pot_terms, damping=params.damping, block_size=params.block_size,
                               act_order=params.act_order, scale_layout=params.scale_layout, device=ctx.device)
            w_hat = ql.dense()
            rel_w[n] = float((w - w_hat).norm() / w.norm().clamp_min(1e-30))
            rel_out[n] = output_error(w, w_hat, hs[n].cpu())
            with torch.no_grad():
                m.weight.data.copy_((w_hat.T if transposed[n] else w_hat).to(m.weight.device, m.weight.dtype))
            dtype = graph[n].dtype
            if params.materialize:
                new_nodes[n] = {n: Const((w_hat.T if transposed[n] else w_hat).contiguous().to(dtype),
                                         label="shiftadd")}
            else:
                new_nodes[n] = {k: Const(v, label="shiftadd") for k, v in ql.tensors(_module_name(n)).items()}
            ctx.status(f"layer {i} out-err {rel_out[n]:.3f}")
        cur = _run_layer(layer_mods[i], cur)  # quantised outputs feed the next layer
    for n, nodes in new_nodes.items():
        if params.materialize:
            graph.nodes[n] = nodes[n]
        else:
            _replace(graph, n, nodes)
    extra = {"weight_rel_error_mean": round(sum(rel_w.values()) / len(rel_w), 5),
             "output_rel_error_mean": round(sum(rel_out.values()) / len(rel_out), 5),
             "output_rel_error": {_module_name(n): round(v, 5) for n, v in rel_out.items()},
             "calibration_tokens": int(tokens.numel())}
    _finish(graph, params, ctx, bits_of, transposed, in_features,
            act_order=params.act_order and not params.materialize,
            extra=extra)
    return graph


def _find_layer(model: torch.nn.Module, modules: dict[str, torch.nn.Module], i: int,
                layer_of: dict[str, int]) -> torch.nn.Module:
    """The decoder layer module holding layer ``i``'s linears: their deepest common ancestor that is an item of
    a ModuleList."""
    targets = [m for n, m in modules.items() if layer_of.get(n) == i]
    if not targets:
        raise SurgeonError(f"shiftadd: layer {i} has no linears")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList):
            for child in mod:
                owned = {id(m) for m in child.modules()}
                if all(id(t) in owned for t in targets):
                    return child
    raise SurgeonError(f"shiftadd: cannot find the decoder layer module of layer {i}")


def dense_view(graph: Graph) -> Graph:
    """A copy of a ShiftAdd-packed graph with every packed linear back as a lazy dense ``X.weight`` (fp32 Ŵ, the
    source orientation) and no ``quantization_config``: lets model-level steps (eval, ...) run after a packed
    shiftadd step. Graphs that are not packed come back unchanged."""
    from surgeon.graph import Apply

    qc = graph.config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return graph
    out = graph.copy()
    del out.config["quantization_config"]
    gs = int(qc["group_size"])
    for prefix, info in qc.get("modules", {}).items():
        keys = [k for k in ("qweight", "pot_exp", "pot_sign", "scales", "perm") if f"{prefix}.{k}" in out.nodes]
        k_in, tr = int(info["in_features"]), bool(info.get("transposed", False))
        n_out = out[f"{prefix}.qweight"].shape[1]

        def dense(*vals: torch.Tensor, keys: list[str] = keys, k_in: int = k_in, tr: bool = tr) -> torch.Tensor:
            t = {f"x.{k}": v for k, v in zip(keys, vals)}
            w = read_packed(t, "x", gs, k_in).dense()
            return w.T if tr else w

        node = Apply(dense, [out[f"{prefix}.{k}"] for k in keys], label="shiftadd-dequant",
                     shape=(k_in, n_out) if tr else (n_out, k_in), dtype=torch.float32)
        _replace(out, f"{prefix}.qweight", {f"{prefix}.weight": node})
        for k in keys[1:]:
            del out.nodes[f"{prefix}.{k}"]
    return out


# ==============================================================================================================
# loader: packed folder -> transformers model whose block linears run the LUT kernel
# ==============================================================================================================
class ShiftAddLinear(torch.nn.Module):
    """A linear layer stored as bit-planes + scales; ``forward`` runs :meth:`PackedLinear.matmul` (LUT GEMV for
    ≤ ``max_lut_batch`` rows, dequantise + BLAS above)."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, *, max_lut_batch: int = 8,
                 device: str = "auto"):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
        self.max_lut_batch = max_lut_batch
        self.compute_device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed.matmul(x, device=self.compute_device, max_lut_batch=self.max_lut_batch)
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.packed.bits}, "
                f"group_size={self.packed.group_size}")


def read_packed(tensors: dict[str, torch.Tensor], prefix: str, group_size: int, in_features: int
                ) -> PackedLinear:
    """Rebuild one :class:`PackedLinear` from its checkpoint tensors (``prefix`` = module name)."""
    qweight = tensors[f"{prefix}.qweight"]
    if f"{prefix}.pot_exp" in tensors:
        scales = pot_decode(tensors[f"{prefix}.pot_exp"], tensors[f"{prefix}.pot_sign"])
    elif f"{prefix}.scales" in tensors:
        scales = tensors[f"{prefix}.scales"].float()
    else:
        raise SurgeonError(f"{prefix}: packed linear without pot_exp/pot_sign or scales")
    perm = tensors.get(f"{prefix}.perm")
    if qweight.shape[-1] != -(-in_features // 8) or scales.shape[-1] != -(-in_features // group_size):
        raise SurgeonError(f"{prefix}: qweight {list(qweight.shape)} / scales {list(scales.shape)} do not fit "
                           f"{in_features} input features at group size {group_size}")
    return PackedLinear(qweight, scales, in_features, group_size, None if perm is None else perm.long())


def load_shiftadd(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  max_lut_batch: int = 8):
    """Load a ShiftAdd-packed folder as a transformers causal LM whose block linears are :class:`ShiftAddLinear`.

    ``device`` is where the model lives (``cpu`` or ``cuda``); on CPU the numba LUT kernel runs for ≤
    ``max_lut_batch`` rows, on CUDA the Triton one (see :data:`surgeon.kernels.shiftadd.KERNEL_CALLS`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgeon.checkpoint import open_checkpoint

    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SurgeonError(f"{folder}: no config.json (expected a folder written by `surgeon shiftadd`)")
    from surgeon.formats import from_disk

    cfg = from_disk(json.loads(cfg_path.read_text()))
    qc = cfg.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise SurgeonError(f"{cfg_path}: quantization_config.quant_method is not {QUANT_METHOD!r} "
                           "(a --materialize output loads with transformers directly)")
    if int(qc.get("layout_version", 0)) > LAYOUT_VERSION:
        raise SurgeonError(f"{cfg_path}: layout_version {qc.get('layout_version')} is newer than this surgeon "
                           f"reads ({LAYOUT_VERSION})")
    group_size = int(qc["group_size"])
    ck = open_checkpoint(folder)
    tensors = {name: ck.load(name) for name in ck.tensors}
    config = AutoConfig.for_model(**cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prefixes = sorted({n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")})
    if not prefixes:
        raise SurgeonError(f"{folder}: no '*.qweight' tensors although config says quant_method shiftadd")
    for prefix in prefixes:
        info = qc.get("modules", {}).get(prefix)
        if not isinstance(info, dict) or "in_features" not in info:
            raise SurgeonError(f"{cfg_path}: quantization_config.modules has no in_features for {prefix}")
        packed = read_packed(tensors, prefix, group_size, int(info["in_features"]))
        packed = PackedLinear(packed.qweight.to(device), packed.scales.to(device), packed.in_features, group_size,
                              None if packed.perm is None else packed.perm.to(device))
        bias = tensors.get(f"{prefix}.bias")
        mod_name, _, leaf = prefix.rpartition(".")
        try:
            parent = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise SurgeonError(f"{folder}: packed module {prefix} does not exist in {cfg.get('model_type')}") from None
        layer = ShiftAddLinear(packed, bias, max_lut_batch=max_lut_batch).to(device)
        setattr(parent, leaf, layer)
        for key in [k for k in tensors if k.startswith(prefix + ".") and k.count(".") == prefix.count(".") + 1]:
            tensors.pop(key)
    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(dense, strict=False, assign=True)
    del result
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SurgeonError(f"{folder}: tensor {missing[0]!r} is missing from the checkpoint")
    model.to(device)
    model.eval()
    return model

