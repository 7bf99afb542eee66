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
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph
from surgeon.registry import register

from .blocks import advance, capture_block_inputs, layer_modules, module_of
from .common import (
    ARCH_HELP,
    EXCLUDE_HELP,
    INCLUDE_HELP,
    Pruned,
    check_nm_shapes,
    nm_prune,
    parse_nm,
    prune_targets,
    roles,
    sparsity_facts,
    transposed_names,
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field("model:32", description="Calibration text: a .txt/.jsonl file, a datasets folder, or "
                      "'model:N' (N sequences sampled from the model itself).")
    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of each output row's weights set to zero.")
    nm: str | None = Field(None, description="Semi-structured N:M pattern instead of a row sparsity, e.g. '2:4'.")
    seqlen: int = Field(512, ge=2, le=2048, description="Tokens per calibration window (capped by the model's "
                        "context; at most 2048 so long-context models do not hang).")
    n_windows: int = Field(64, ge=1, le=4096, description="Number of calibration windows (the reference uses 128).")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass during calibration.")
    include: list[str] | None = Field(None, description=INCLUDE_HELP)
    exclude: list[str] = Field(default_factory=list, description=EXCLUDE_HELP)
    arch: dict[str, Any] | None = Field(None, description=ARCH_HELP)

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        parse_nm(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        nm = parse_nm(self.nm)
        if nm is not None and "sparsity" in self.model_fields_set and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"sparsity={self.sparsity} contradicts nm={self.nm}; give one of them")
        return self


# --- pure tensor math --------------------------------------------------------------------------------------

def wanda_scores(w: torch.Tensor, sq_norm: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """S_ij = |W_ij|·‖X_j‖₂ (eq. 1), in Linear orientation [out, in] (Conv1D storage is transposed first)."""
    wf = w.float().T if transposed else w.float()
    return wf.abs() * sq_norm.float().clamp_min(0).sqrt()[None, :]


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, *, transposed: bool = False,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask (True = prune) in the storage layout of ``w``: per output row the ⌊s·d_in⌋ lowest scores
    (ties: lower input index first), or per N:M group the M−N lowest."""
    score = wanda_scores(w, sq_norm, transposed=transposed)
    if nm is not None:
        n, m = nm
        kept = nm_prune(torch.ones_like(score), n, m, score=score)
        mask = kept == 0
    else:
        k = min(score.shape[1], math.floor(sparsity * score.shape[1] + 1e-9))
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k:
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
    return mask.T.contiguous() if transposed else mask


class InputNorms:
    """Forward hooks accumulating Σ x_j² over all tokens at the input of each watched module (fp64)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = (x * x).sum(0)
            self.sums[name] = self.sums[name] + s if name in self.sums else s

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def wanda_prune_model(model: nn.Module, layers: list[nn.Module], targets_by_layer: list[list[str]],
                      batches, *, sparsity: float, nm: tuple[int, int] | None, transposed: set[str],
                      progress=None) -> dict[str, torch.Tensor]:
    """Sequential Wanda over ``layers``; prunes the module in place and returns ``{graph name: mask}``."""
    masks: dict[str, torch.Tensor] = {}
    steps = range(len(layers)) if progress is None else progress(range(len(layers)), len(layers), "Wanda")
    for i in steps:
        layer, names = layers[i], targets_by_layer[i]
        mods = {n: module_of(model, n)[0] for n in names}
        norms = InputNorms(mods)
        try:
            advance_inputs = [b.hidden for b in batches]
            advance(layer, batches)  # runs the dense block once: hooks see its inputs
        finally:
            norms.close()
        for b, h in zip(batches, advance_inputs):  # rewind: outputs are recomputed after pruning
            b.hidden = h
        for n in names:
            mod, leaf, _ = module_of(model, n)
            w = getattr(mod, leaf)
            if n not in norms.sums:
                raise SurgeonError(f"{n!r}: its module was not called during calibration (not a linear?)")
            mask = wanda_mask(w.detach(), norms.sums[n], sparsity, transposed=n in transposed, nm=nm)
            with torch.no_grad():
                w.masked_fill_(mask.to(w.device), 0)
            masks[n] = mask.cpu()
        advance(layer, batches)  # outputs of the pruned block feed the next one
    return masks


def _apply_mask(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return w.float().masked_fill(mask, 0)


# --- graph wiring ---------------------------------------------------------------------------------------------

@register("prune.wanda", Params, model_level=True)
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Wanda pruning: |W|·‖X‖ with calibration data."""
    names = prune_targets(graph, params.include, params.exclude, params.arch)
    nm = parse_nm(params.nm)
    trans = transposed_names(graph, names, params.arch)
    if nm is not None:
        check_nm_shapes(graph, names, nm[1], trans)
    r = roles(graph, params.arch)
    by_layer: list[list[str]] = [[] for _ in range(r.n_layers)]
    prefixes = [r.layer_prefix(i) for i in range(r.n_layers)]
    for n in names:
        i = next((i for i, p in enumerate(prefixes) if n.startswith(p)), None)
        if i is None:
            raise SurgeonError(f"prune.wanda: {n!r} is not inside a decoder block (Wanda prunes block linears; "
                               "use prune.magnitude for embeddings or lm_head)")
        by_layer[i].append(n)
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.n_windows)
    model = ctx.module(graph, dtype="float32")
    layers = layer_modules(model, prefixes)
    with ctx.timed("calibrate"):
        batches = capture_block_inputs(model, layers[0], tokens, params.batch_size)
        masks = wanda_prune_model(model, layers, by_layer, batches, sparsity=params.sparsity, nm=nm,
                                  transposed=trans, progress=ctx.progress)
    del model, batches
    out = graph.copy()
    per_tensor = {}
    for n, mask in masks.items():
        dense = graph[n]
        out.nodes[n] = Pruned(_apply_mask, [dense, Const(mask, label="wanda-mask")], dense=dense,
                              label="prune-wanda")
        per_tensor[n] = (int(mask.sum()), mask.numel())
    ctx.report(method="wanda", nm=params.nm, calibration_windows=int(tokens.shape[0]),
               calibration_seqlen=int(tokens.shape[1]), **sparsity_facts(per_tensor))
    return out
