"""``edit.rome``: r-ROME rank-one knowledge edit of one MLP down-projection.

Meng et al., "Locating and Editing Factual Associations in GPT" (arXiv 2202.05262), in the consistent form of
Gupta et al., "Rebuilding ROME" (arXiv 2403.07175): u = C⁻¹k, ΔW = (v* − Wk)uᵀ/(uᵀk) with one averaged key k,
so the edited layer maps k to v* exactly. Several requests are applied one after another.
See ``docs/edit.md`` and ALGORITHMS.md §4.
"""
from __future__ import annotations

from surgeon.registry import register

from .editing import EditParams, run_edit


class Params(EditParams):
    """ROME knobs: those of :class:`EditParams` (ROME has no λ: the edit holds exactly)."""


@register("edit.rome", Params, model_level=True,
          summary="ROME rank-one knowledge edit of one MLP (Meng et al. 2022).")
def apply(graph, params: Params, ctx):
    """Rewrite each request's fact with a rank-one update (sequentially)."""
    return run_edit(graph, params, ctx, "rome")
