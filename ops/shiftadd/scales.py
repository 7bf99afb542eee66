"""Scale rounding for ShiftAdd: α ≈ ±2^k1 ± 2^k2 ± 2^k3 (APoT, arXiv 1909.13144; ALGORITHMS.md §7.1) or fp16."""
from __future__ import annotations

import torch

from surgeon.formats.shiftadd import ABSENT_EXP

FP16_SPAN = 10  # APoT terms lie within 2^-10 of the leading one, so every scale is exact in fp16


def pot_greedy(alpha: torch.Tensor, terms: int, exps: torch.Tensor | None = None, neg: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Greedy APoT rounding (§7.1): k = round(log2|residual|), term = sign·2^k, repeat ``terms`` times; fp32 values.

    Terms below 2^(k1−10) are dropped so the value is exact in fp16. When given, fills ``exps`` int8
    [..., terms] (``ABSENT_EXP`` for unused terms) and ``neg`` uint8 [...] (bit t = term t negative)."""
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


def round_scales(alpha: torch.Tensor, pot_terms: int) -> torch.Tensor:
    """α as it will be stored: APoT values (``pot_terms`` > 0) or fp16-rounded values."""
    if pot_terms > 0:
        return pot_greedy(alpha, pot_terms)
    return alpha.half().float()
