"""Binary-coding quantisation (BCQ, Xu et al., arXiv 1802.00150): W ≈ Σ_i α_i B_i per row, and the weight-only
per-group fit of ShiftAdd (ALGORITHMS.md §7.1)."""
from __future__ import annotations

import functools

import torch
from surgeon.kernels.shiftadd import PackedLinear
from surgeon.kernels.shiftadd_cpu import pack_signs
from surgeon.ops.shiftadd.scales import round_scales

from surgeon.formats.shiftadd import packed_tensors


@functools.lru_cache(maxsize=32)
def codebook(bits: int, device: torch.device) -> torch.Tensor:
    """All 2^q sign combinations, [2^q, q] of ±1 (cached: the BCQ loop asks for it thousands of times)."""
    idx = torch.arange(2 ** bits, device=device)
    return (((idx[:, None] >> torch.arange(bits, device=device)) & 1) * 2 - 1).float()


def _codeword_values(alpha: torch.Tensor) -> torch.Tensor:
    """Value of every codeword Σ_i α_i b_i per row: [R, 2^q] in :func:`codebook` order."""
    return alpha @ codebook(alpha.shape[1], alpha.device).T


def codeword_search(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted codeword values of each row [R, 2^q − 1] and the codebook index of each sorted
    value [R, 2^q], for :func:`nearest_in`."""
    values, order = _codeword_values(alpha).sort(dim=1)
    return (0.5 * (values[:, 1:] + values[:, :-1])).contiguous(), order


def nearest_in(w: torch.Tensor, mids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Codebook index of the codeword nearest to each element of ``w`` [R, C] by binary search on the midpoints; a
    weight exactly on a midpoint takes the larger codeword (as the reference's find_B_torch)."""
    return order.gather(1, torch.searchsorted(mids, w.contiguous(), right=True))


def nearest_code(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Index (into :func:`codebook`) of the codeword nearest to each element of ``w`` [R, C]; int64 [R, C].

    The 2^q values of a row are sorted once and each weight is placed by binary search on the midpoints
    between neighbours, O(R·C·q) instead of comparing against all 2^q codewords.
    """
    return nearest_in(w, *codeword_search(alpha))


def _code_error(w: torch.Tensor, alpha: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Squared error per row of the codes' reconstruction."""
    return ((w - _codeword_values(alpha).gather(1, codes)) ** 2).sum(1)


def _least_squares_scales(w: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """α = (BᵀB)⁻¹Bᵀw per row, with BᵀB and Bᵀw accumulated per codeword (counts and sums of w), so the
    [R, C, q] sign tensor is never formed."""
    book = codebook(bits, w.device)
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
    return best_alpha, codebook(bits, w.device)[best_codes], history


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

    @classmethod
    def from_codes(cls, codes: torch.Tensor, alpha: torch.Tensor, group_size: int, pot_terms: int,
                   perm: torch.Tensor | None = None) -> QuantizedLinear:
        """From codebook indices ``codes`` [N, K] (bit i of an index = plane i is +1) and α [q, N, G], packed one
        plane at a time (a [q, N, K] sign tensor is 0.5 GB of temporaries for a 14336 × 4096 linear at 3 bits)."""
        bits = alpha.shape[0]
        out = cls.__new__(cls)
        out.in_features = codes.shape[-1]
        out.qweight = torch.stack([pack_signs(((codes >> i) & 1).bool().cpu()) for i in range(bits)])
        out.alpha = alpha.float().cpu().contiguous()
        out.group_size, out.pot_terms = group_size, pot_terms
        out.perm = None if perm is None else perm.cpu().to(torch.int32)
        return out

    @property
    def bits(self) -> int:
        return self.qweight.shape[0]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The packed tensors of this linear under ``prefix`` (the module name; see surgeon.formats.shiftadd)."""
        return packed_tensors(prefix, self.qweight, self.alpha, self.pot_terms, self.perm)

    def packed(self) -> PackedLinear:
        return PackedLinear(self.qweight, self.alpha, self.in_features, self.group_size,
                            None if self.perm is None else self.perm.long())

    def dense(self, rows_per_chunk: int = 512) -> torch.Tensor:
        """Ŵ [N, K] in the original column order, dequantised ``rows_per_chunk`` rows at a time: the dense view
        makes [q, rows, K] fp32 temporaries (signs, repeated scales, their product), 2 GB at once for a
        4096×14336 linear at 3 bits, 0.25 GB per 512-row chunk."""
        n = self.qweight.shape[1]
        out = torch.empty(n, self.in_features)
        perm = None if self.perm is None else self.perm.long()
        for r0 in range(0, n, rows_per_chunk):
            rows = slice(r0, r0 + rows_per_chunk)
            out[rows] = PackedLinear(self.qweight[:, rows], self.alpha[:, rows], self.in_features, self.group_size,
                                     perm).dense()
        return out


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


def fit_row_groups(x: torch.Tensor, rows_per_group: int, bits: int, *, rounds: int, pot_terms: int
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
