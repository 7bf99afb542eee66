"""Op registry: ``@register("family.name", Params)`` on an ``apply(graph, params, ctx) -> graph`` function.

The CLI subcommand and the YAML recipe step are both generated from ``Params`` (a pydantic model): field
descriptions become ``--help`` text, defaults and validation are pydantic's. ``OP_INDEX`` is static so that
``surgeon --help`` lists every op without importing any op module (or torch).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from pydantic import BaseModel

#: op name -> (module that registers it, one-line summary). Keep sorted by family.
OP_INDEX: dict[str, tuple[str, str]] = {
    "cast": ("surgeon.ops.basic", "Change tensor dtypes, with per-pattern exceptions (e.g. keep norms in fp32)."),
    "drop": ("surgeon.ops.basic", "Remove tensors whose names match a regular expression."),
    "rename": ("surgeon.ops.basic", "Rename tensors with a regular expression substitution."),
    "eval": ("surgeon.ops.evaluate", "Perplexity, fact recall and samples; results go to the card."),
    "merge.linear": ("surgeon.ops.merge.classic", "Weighted average of checkpoints."),
    "merge.task-arithmetic": ("surgeon.ops.merge.classic", "Base + λ·Σ task vectors (Ilharco et al. 2023)."),
    "merge.ties": ("surgeon.ops.merge.classic", "TIES: trim, elect sign, disjoint mean (Yadav et al. 2023)."),
    "merge.dare": ("surgeon.ops.merge.classic", "DARE: random drop and rescale of task vectors (Yu et al. 2024)."),
    "merge.slerp": ("surgeon.ops.merge.interpolate", "SLERP of two models, t per layer and per filter (gradients)."),
    "merge.nuslerp": ("surgeon.ops.merge.interpolate", "NuSLERP: spherical interpolation of two models or task vectors."),
    "merge.multislerp": ("surgeon.ops.merge.interpolate", "Multi-SLERP: barycentric interpolation on the hypersphere."),
    "merge.karcher": ("surgeon.ops.merge.interpolate", "Karcher (Riemannian) mean of the models on the sphere."),
    "merge.model-stock": ("surgeon.ops.merge.interpolate", "Model Stock: fine-tunes' average pulled toward the base."),
    "merge.nearswap": ("surgeon.ops.merge.interpolate", "NearSwap: take the other model's values where they are close."),
    "merge.breadcrumbs": ("surgeon.ops.merge.gta", "Model Breadcrumbs: drop outliers and small task-vector entries."),
    "merge.breadcrumbs-ties": ("surgeon.ops.merge.gta", "Model Breadcrumbs with TIES sign election."),
    "merge.della": ("surgeon.ops.merge.gta", "DELLA: magnitude-ranked random drop, rescale, TIES election."),
    "merge.della-linear": ("surgeon.ops.merge.gta", "DELLA without sign election (weighted sum)."),
    "merge.sce": ("surgeon.ops.merge.gta", "SCE: select by variance, weights from mean squares, erase signs."),
    "merge.passthrough": ("surgeon.ops.merge.slices", "Frankenmerge / depth up-scaling from layer slices."),
    "merge.mwa": ("surgeon.ops.merge.mwa", "Metrics-weighted averaging of checkpoints of one run (arXiv 2504.18580)."),
    "merge.opcm": ("surgeon.ops.merge.opcm", "Orthogonal-projection continual merging (OPCM)."),
    "merge.rmm": ("surgeon.ops.merge.rmm", "Reversible merging of low-rank weights (arXiv 2510.14163)."),
    "merge.revert": ("surgeon.ops.merge.revert", "Rebuild one task's adapter or model from an RMM merge."),
    "edit.rome": ("surgeon.ops.edit.rome", "ROME rank-one knowledge edit of one MLP (Meng et al. 2022)."),
    "edit.emmet": ("surgeon.ops.edit.emmet", "EMMET batched equality-constrained edits (Gupta et al. 2024)."),
    "edit.memit": ("surgeon.ops.edit.memit", "MEMIT mass edits spread over several MLP layers (Meng et al. 2023)."),
    "edit.alphaedit": ("surgeon.ops.edit.alphaedit", "AlphaEdit: MEMIT edits projected onto the preserved keys' null space."),
    "erase.rece": ("surgeon.ops.erase.rece", "RECE concept erasure in cross-attention (Gong et al. 2024)."),
    "erase.uce": ("surgeon.ops.erase.uce", "UCE closed-form concept erasure (Gandikota et al. 2024)."),
    "prune.magnitude": ("surgeon.ops.prune.magnitude", "Magnitude pruning: per-layer, global or N:M."),
    "prune.wanda": ("surgeon.ops.prune.wanda", "Wanda pruning: |W|·‖X‖ with calibration data (Sun et al. 2024)."),
    "retrain.perp": ("surgeon.ops.retrain.perp", "PERP: retrain norms, biases and MaskLoRA after pruning."),
    "shiftadd": ("surgeon.ops.shiftadd.op", "ShiftAdd: binary-coded weights with power-of-two scales + LUT kernel."),
    "tie": ("surgeon.ops.tie.op", "Relaxed Recursive Transformer: tie layers, relax with SVD LoRA."),
    "recover": ("surgeon.ops.recover.op", "CheckFree: rebuild a lost pipeline stage from its neighbours."),
}


@dataclass(frozen=True)
class OpSpec:
    name: str
    params: type[BaseModel]
    apply: Callable[..., Any]
    summary: str
    multi_model: bool = False  # takes several checkpoints (merges)
    writes: bool = True  # False for report-only ops (eval), whose CLI has no --output
    model_level: bool = False  # needs forward passes (materialises the graph as a module)


_REGISTRY: dict[str, OpSpec] = {}


def register(name: str, params: type[BaseModel], *, multi_model: bool = False, writes: bool = True,
             model_level: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``apply`` under ``name``; the name must be listed in ``OP_INDEX``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        summary = OP_INDEX.get(name, ("", (fn.__doc__ or "").strip().split("\n")[0]))[1]
        _REGISTRY[name] = OpSpec(name, params, fn, summary, multi_model, writes, model_level)
        return fn

    return wrap


def get_op(name: str) -> OpSpec:
    if name not in _REGISTRY:
        if name not in OP_INDEX:
            from difflib import get_close_matches

            near = get_close_matches(name, list(OP_INDEX), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SurgeonError(f"unknown operation {name!r}{hint}")
        importlib.import_module(OP_INDEX[name][0])
        if name not in _REGISTRY:
            raise SurgeonError(f"internal: module {OP_INDEX[name][0]} does not register {name!r}")
    return _REGISTRY[name]


def families() -> dict[str, list[str]]:
    """CLI grouping: ``merge.ties`` -> group ``merge`` command ``ties``; ``tie`` stays top-level."""
    out: dict[str, list[str]] = {}
    for name in OP_INDEX:
        fam, _, sub = name.partition(".")
        out.setdefault(fam if sub else "", []).append(sub or fam)
    return out
