"""RECE: Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models", ECCV 2024,
arXiv 2407.12383 (ALGORITHMS.md §5). The UCE step of :mod:`.uce`, then epochs of (closed-form adversarial
embedding, re-erase it), all on one d×d matrix M shared by every k/v matrix (the epochs' algebra is in
:mod:`.closed_form`: ``rece_epochs``); the weights are read once more, for H = Σ WᵀW.
"""
from __future__ import annotations

import torch
from pydantic import Field

from surgeon.graph import Graph
from surgeon.registry import register

from .closed_form import GramAccumulator, rece_epochs
from .uce import Refined, UceParams, WeightPass, erase
from .weights import WeightChunk, stacked_weights


class ReceParams(UceParams):
    epochs: int | None = Field(None, ge=0, le=100, description="RECE epochs after the UCE step (preset default; "
                               "3 without a preset). 0 = UCE only.")
    regularizer: float | None = Field(None, gt=0, description="λ_r of the adversarial embedding, weight of ‖c′‖² "
                                      "(preset default; 0.1 without one).")
    rece_lambda: float = Field(0.1, gt=0, description="λ of each RECE edit (RECE code: 0.1).")
    rece_erase_scale: float = Field(1.0, gt=0, description="η_e of each RECE edit.")
    rece_preserve_scale: float = Field(0.1, gt=0, description="η_p of each RECE edit; RECE preserves E(' ') once "
                                       "per concept plus --preserve.")
    attack_templates: bool = Field(False, description="With --templates, RECE epochs also attack every templated "
                                   "prompt (6x the adversarial embeddings); default: the bare concepts only, as "
                                   "RECE's code.")


def rece_refine(graph: Graph, params: ReceParams, ctx, emb: dict, settings: dict, wp: WeightPass,
                L: torch.Tensor, R: torch.Tensor, clock) -> Refined:
    """H = Σ WᵀW in one pass over the weights (kept for the apply pass when small), then RECE's epochs on the
    factors (L, R) of M − I."""
    kept: list[WeightChunk] = []
    acc = GramAccumulator(emb["C"].shape[1], dtype=wp.dtype, device=ctx.device)
    for chunk in stacked_weights(graph, wp.groups, wp.dtype, ctx.device, ctx, "Σ WᵀW"):
        acc.add(chunk.data)
        if wp.keep:
            kept.append(chunk)
    clock.lap("gram")
    epochs = settings["epochs"]
    res = rece_epochs(None, acc.H.cpu(), emb["concepts_full"], emb["targets_full"], emb["rece_P"], epochs=epochs,
                      lam_r=settings["regularizer"], lam=params.rece_lambda, eta_e=params.rece_erase_scale,
                      eta_p=params.rece_preserve_scale, factors=(L, R), device=ctx.device)
    clock.lap("rece_epochs")
    log = [e.as_dict() for e in res.log]
    summary = {"rece": {"epochs": epochs, "regularizer": settings["regularizer"], "lambda": params.rece_lambda,
                        "erase_scale": params.rece_erase_scale, "preserve_scale": params.rece_preserve_scale,
                        "log": log}}
    return Refined(res.L, res.R, kept, summary, log, [e.adversarial_norm for e in res.log])


@register("erase.rece", ReceParams, model_level=True,
          summary="RECE concept erasure in cross-attention (Gong et al. 2024).")
def apply(graph: Graph, params: ReceParams, ctx) -> Graph:
    """RECE: UCE, then epochs of (closed-form adversarial embedding, re-erase it)."""
    return erase(graph, params, ctx, method="erase.rece", refine=rece_refine)
