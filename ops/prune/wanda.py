"""Wanda: prune by |W_ij|·‖X_j‖₂, each output row to exactly the target sparsity (Sun, Liu, Bair & Kolter,
"A Simple and Effective Pruning Approach for Large Language Models", arXiv 2306.11695; ``locuslab/wanda``).

Calibration is sequential, as in the reference: block l's input norms are measured on activations that already
went through the pruned blocks < l. No weight update. Calibration windows are capped at 2048 tokens
(``ctx.tokens`` caps the window length) so long-context models do not hang. The result is dense with exact zeros;
the pruned tensors stay lazy (the dense source tensor times a stored boolean mask).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from surgeon import engine
from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.registry import register

from .common import (
    CalibratedPruneParams,
    NmPattern,
    Pruned,
    check_nm_shapes,
    nm_prune,
    parse_nm,
    prune_targets,
    sparsity_facts,
    transposed_names,
)
from .protect import (
    FRACTION_HELP,
    MODE_HELP,
    PROTECT_HELP,
    Protection,
    ProtectMode,
    plan_protection,
    protect_score,
)


class Params(CalibratedPruneParams):
    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of each output row's weights set to zero.")
    nm: NmPattern = Field(None, description="Semi-structured N:M pattern instead of a row sparsity, e.g. '2:4'.")
    protect_edits: bool | None = Field(None, description=PROTECT_HELP)
    protect_mode: ProtectMode = Field("refit", description=MODE_HELP)
    protect_fraction: float = Field(0.05, ge=0, le=0.5, description=FRACTION_HELP)


# --- pure tensor math --------------------------------------------------------------------------------------

def wanda_scores(w: torch.Tensor, sq_norm: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """S_ij = |W_ij|·‖X_j‖₂ (eq. 1), in Linear orientation [out, in] (Conv1D storage is transposed first)."""
    wf = w.float().T if transposed else w.float()
    return wf.abs() * sq_norm.float().clamp_min(0).sqrt()[None, :]


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, *, transposed: bool = False,
               nm: tuple[int, int] | None = None, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (True = prune) in the storage layout of ``w``: per output row the ⌊s·d_in⌋ lowest scores
    (ties: lower input index first), or per N:M group the M−N lowest; ``protected`` entries (storage layout,
    :mod:`.protect`) score +∞."""
    score = wanda_scores(w, sq_norm, transposed=transposed)
    if protected is not None:
        score = protect_score(score, protected.T if transposed else protected)
    if nm is not None:
        n, m = nm
        kept = nm_prune(torch.ones_like(score), n, m, score=score)
        mask = kept == 0
    else:
        k = min(score.shape[1], math.floor(sparsity * score.shape[1] + 1e-9))
        mask = lowest_k_per_row(score, k)
    return mask.T.contiguous() if transposed else mask


def lowest_k_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of each row's ``k`` lowest entries, ties taken lower column first: the same set as the
    first ``k`` indices of a stable sort, found by a k-th value per row (linear time; the sort was half of a
    Wanda block's time at 14336 inputs)."""
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = torch.kthvalue(score, k, dim=1, keepdim=True).values
    mask = score < kth
    at_kth = score == kth
    missing = k - mask.sum(1, keepdim=True)
    mask |= at_kth & (at_kth.cumsum(1) <= missing)
    return mask


def prune_block(block, stats: dict[str, Any], names: list[str], *, sparsity: float, nm: tuple[int, int] | None,
                transposed: set[str], protect: Protection | None = None) -> dict[str, torch.Tensor]:
    """Wanda on one engine block: mask each target from its input norms and zero it in place (the engine then
    runs the pruned block to feed the next one; an edited matrix gets ``protect``'s refit). Returns
    ``{graph name: mask}``."""
    masks = {}
    for n in names:
        st = stats.get(n)
        if st is None or st.count == 0:
            raise SurgeonError(f"{n!r}: its module was not called during calibration (not a linear?)")
        w = block.param(n)
        mask = wanda_mask(w.detach(), st.sq_norm, sparsity, transposed=n in transposed, nm=nm,
                          protected=protect.rank_mask(n) if protect else None)
        with torch.no_grad():
            refit = protect is not None and n in protect.keys
            dense = w.detach().clone() if refit else None
            w.masked_fill_(mask.to(w.device), 0)
            if refit:
                w.copy_(protect.finish(n, w.detach(), dense, n in transposed).to(w.device, w.dtype))
        masks[n] = mask.cpu()
    return masks


def _apply_mask(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return w.float().masked_fill(mask, 0)


def _masked_protected(name: str, protect: Protection, transposed: bool):
    def fn(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return protect.finish(name, _apply_mask(w, mask), w, transposed)

    return fn


# --- graph wiring ---------------------------------------------------------------------------------------------

@register("prune.wanda", Params, model_level=True,
          summary="Wanda pruning: |W|·‖X‖ with calibration data (Sun et al. 2024).")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Wanda pruning: |W|·‖X‖ with calibration data."""
    names = prune_targets(graph, params.include, params.exclude, params.arch)
    nm = parse_nm(params.nm)
    trans = transposed_names(graph, names, params.arch)
    if nm is not None:
        check_nm_shapes(graph, names, nm[1], trans)
    r = ctx.roles(graph, overrides=params.arch)
    by_layer: list[list[str]] = [[] for _ in range(r.n_layers)]
    prefixes = [r.layer_prefix(i) for i in range(r.n_layers)]
    for n in names:
        i = next((i for i, p in enumerate(prefixes) if n.startswith(p)), None)
        if i is None:
            raise SurgeonError(f"prune.wanda: {n!r} is not inside a decoder block (Wanda prunes block linears; "
                               "use prune.magnitude for embeddings or lm_head)")
        by_layer[i].append(n)
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.n_windows)
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=params.batch_size, roles=r)
    spill = eng.spill
    protect = plan_protection(graph, names, params.protect_edits, params.protect_mode, params.protect_fraction)
    mask_nodes: dict[str, Any] = {}
    per_tensor: dict[str, tuple[int, int]] = {}

    def change(block, stats) -> None:
        for n, mask in prune_block(block, stats, by_layer[block.index], sparsity=params.sparsity, nm=nm,
                                   transposed=trans, protect=protect).items():
            per_tensor[n] = (int(mask.sum()), mask.numel())
            mask_nodes[n] = spill.put(f"{n}.wanda-mask", mask, label="wanda-mask")

    with ctx.timed("calibrate"):
        eng.run(tokens, observe={n: ("sq_norm",) for n in names}, change=change, record=False,
                layers=[i for i, ns in enumerate(by_layer) if ns], transposed=trans, progress=ctx.progress)
    ctx.report(**eng.timing())
    del eng
    out = graph.copy()
    for n, mask_node in mask_nodes.items():
        dense = graph[n]
        fn = _masked_protected(n, protect, n in trans) if n in protect.keys else _apply_mask
        out.replace(n, Pruned(fn, [dense, mask_node], dense=dense, label="prune-wanda"))
    ctx.report(method="wanda", nm=params.nm, calibration_windows=int(tokens.shape[0]),
               calibration_seqlen=int(tokens.shape[1]), **sparsity_facts(per_tensor),
               **protect.facts(params.protect_fraction))
    return out
