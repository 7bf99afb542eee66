"""``edit.emmet``: EMMET batched equality-constrained knowledge edits (MEMIT as its large-λ′ limit).

Gupta, Sajnani & Anumanchipalli, "A Unified Framework for Model Editing" (arXiv 2403.14236):
ΔW = R (KᵀC⁻¹K + λ′I)⁻¹ KᵀC⁻¹ with R = V − WK over a batch of keys K (one per unique subject). λ′ → 0 makes
every edit hold exactly (n = 1 is r-ROME); λ′ of order d_k and more is MEMIT's single-layer least squares
(Meng et al., arXiv 2210.07229), which writes only part of each residual. Batches hold at most ``batch_size``
unique subjects; larger sets (and repeated subjects) are applied in sequential batches.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from surgeon.registry import register

from .editing import EditParams, run_edit


class Params(EditParams):
    """EMMET knobs: those of :class:`EditParams` plus the ridge λ′ and the batch size."""

    lam: float | None = Field(None, ge=0, description="Ridge λ′ on KᵀC⁻¹K (C per token). Default 0.1 "
                                                      "(GPT-2: 100); ≳ d_k behaves like MEMIT.")
    batch_size: int = Field(1024, ge=1, le=1024, description="Unique subjects per batch (≤ 1024); more are "
                                                             "applied in sequential batches.")
    residual: Literal["paper", "delta"] = Field(
        "paper", description="Residual of the closed form: 'paper' R = v* − Wk̄ with the averaged key (the "
                             "paper's equation, r-ROME's consistent form) or 'delta' R = δ = v* − v₀ (the authors' "
                             "code). See docs/edit.md for both measured.")
    ridge_single: bool = Field(False, description="Add λ′ also for a batch of one key (the authors' code adds it "
                                                  "only for batches of more than one).")


@register("edit.emmet", Params, model_level=True,
          summary="EMMET batched equality-constrained edits (Gupta et al. 2024).")
def apply(graph, params: Params, ctx):
    """Rewrite all requests' facts with one closed-form update per batch."""
    return run_edit(graph, params, ctx, "emmet", lam=params.lam, batch_size=params.batch_size,
                    residual=params.residual, ridge_single=params.ridge_single)
