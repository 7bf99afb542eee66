"""Sparsified task arithmetic beyond TIES/DARE: Model Breadcrumbs, DELLA, SCE.

One shape (mergekit's "generalised task arithmetic"): each task vector τ_i = θ_i − θ_b is sparsified, weighted,
optionally sign-elected (TIES consensus), summed, optionally divided by the (agreeing) weights and added to the
base times λ. The sparsifiers:

- Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): drop the γ·N largest |τ| (outliers) and the smallest,
  keeping ``int(density·N)`` entries just below the outliers (fewer outliers are dropped when density + γ > 1).
- DELLA MagPrune (Deep et al. 2024, arXiv 2406.11617, §3.1): per row, rank |τ| ascending; entry r (of n) is kept
  with probability p_r = (density − ε) + 2ε·(r − 1)/(n − 1); kept entries are rescaled by 1/p_r (the paper's
  Eq. 2) or so that τ keeps its L1 norm (mergekit). Seeded per (run seed + the op's offset, tensor, model):
  order-independent.
- SCE (Wan et al. 2024, arXiv 2408.07990): Select the top-k entries by the variance across models, Calculate
  per-model weights ∝ mean τ_i², Erase minority signs (TIES sum election), merge Σ w_i τ_i / Σ_agree w_i.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from surgeon.ops.merge.inputs import VocabMergeParams, check_compatible, gather_inputs, merged_graph
from surgeon.ops.merge.sparsify import (
    check_unit_interval,
    chunked_disjoint_mean,
    l1_rescale,
    sign_election,
    tensor_seed,
)
from surgeon.ops.merge.values import (
    LayerValue,
    layer_value,
    model_values,
    num_layers,
    parse_float_list,
    parse_layer_value,
    per_model_field,
    resolve_per_model,
)

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.registry import register

# ---------------------------------------------------------------------------------------------------------
# pure math


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep ``int(density·N)`` entries ranked just below the ``int(γ·N)`` largest |δ| (ascending sort order)."""
    n = delta.numel()
    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom:bottom + keep]] = True
    return mask.reshape(delta.shape)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (density − ε) + 2ε · normalised ascending rank of |δ| within each row (a 1-D tensor is one row)."""
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise SurgeonError(f"della: density ± epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    mag = rows.abs().float()
    ranks = torch.argsort(torch.argsort(mag, dim=1), dim=1).float()  # 0 .. n−1
    n = rows.shape[1]
    rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def della_drop(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *,
               rescale: Literal["probability", "l1", "none"] = "probability") -> torch.Tensor:
    """MagPrune: keep each entry with its rank-dependent probability; rescale the kept ones."""
    if density >= 1.0:
        return delta.float()
    p = della_keep_probabilities(delta, density, epsilon)
    keep = torch.rand(p.shape, generator=generator) < p
    kept = delta.float() * keep
    if rescale == "probability":
        return kept / p
    if rescale == "l1":
        return l1_rescale(kept, delta.float())
    return kept


def generalised_task_arithmetic(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float],
                                sparsify: Callable[[int, torch.Tensor], torch.Tensor], *,
                                consensus: Literal["none", "sum", "count"], normalize: bool,
                                scale: float = 1.0) -> torch.Tensor:
    """θ_b + λ · Σ_agree w_i s(τ_i) (/ Σ_agree w_i when ``normalize``); s = ``sparsify(i, τ_i)``."""
    b = base.float()
    deltas = torch.stack([sparsify(i, v.float() - b) for i, v in enumerate(values)])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).reshape(-1, *([1] * b.dim()))
    if consensus != "none":
        # sign of Σ w_i s(τ_i) (sum) or majority of sign(w_i s(τ_i)) (count); chunked so temporaries stay small
        election = "weighted" if consensus == "sum" else "count"
        return b + scale * chunked_disjoint_mean(deltas, weights, normalize=normalize, election=election)
    deltas.mul_(w)
    mixed = deltas.sum(0)
    total = float(sum(float(x) for x in weights))
    divisor = torch.tensor(total if abs(total) >= 1e-8 else 1.0)
    if normalize:
        mixed = mixed / divisor
    return b + scale * mixed


def sce_merge(base: torch.Tensor, values: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE: variance-based selection, mean-square weights, sign erase, weighted disjoint mean."""
    b = base.float()
    taus = torch.stack([v.float() - b for v in values])
    if select_topk < 1.0:
        mask = torch.zeros(b.shape)
        if select_topk > 0:
            var = torch.var(taus, dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1.0
        taus = taus * mask.unsqueeze(0)
    agree = (torch.sign(taus) == sign_election(taus, method="sum")).float()
    ms = taus.square().reshape(taus.shape[0], -1).mean(1)
    total = float(ms.sum())
    w = torch.full_like(ms, 1.0 / ms.shape[0]) if abs(total) < 1e-6 else ms / total
    w = w.reshape(-1, *([1] * b.dim())) * agree
    return b + (taus * w).sum(0) / w.sum(0).clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------------------
# params


class _GtaParams(VocabMergeParams):
    weights: list[float] | None = Field(None, description="One weight per model, in order (default: all 1).")
    density: LayerValue = Field(1.0, description=(
        "Fraction of each task vector kept: a number, a list over layers or {pattern: value}."))
    scale: LayerValue = Field(1.0, description="λ multiplying the merged task vector (mergekit's lambda).")
    per_model: dict[str, dict[str, LayerValue]] = per_model_field()

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, v: Any) -> Any:
        return parse_float_list(v)

    @field_validator("density", "scale", mode="before")
    @classmethod
    def _parse_values(cls, v: Any) -> Any:
        return parse_layer_value(v)

    @field_validator("per_model", mode="before")
    @classmethod
    def _parse_per_model(cls, v: Any) -> Any:
        return parse_layer_value(v) if isinstance(v, str) else v


class BreadcrumbsParams(_GtaParams):
    gamma: LayerValue = Field(0.01, description="Fraction of largest-magnitude entries (outliers) dropped.")
    normalize: bool = Field(False, description="Divide by the (agreeing) weights.")

    @field_validator("gamma", mode="before")
    @classmethod
    def _parse_gamma(cls, v: Any) -> Any:
        return parse_layer_value(v)


class DellaParams(_GtaParams):
    density: LayerValue = Field(0.5, description=(
        "Mean keep probability of a task-vector entry: a number, a list over layers or {pattern: value}."))
    epsilon: LayerValue = Field(0.15, description=(
        "Half-width of the keep probabilities: from density − ε (smallest |τ|) to density + ε (largest)."))
    seed: int = Field(0, description=(
        "Seed of the random masks, added to the run's seed (a recipe's top-level seed; 0 from the command line). "
        "Each tensor's mask depends on that sum, the tensor's name and the model."))
    rescale: Literal["probability", "l1", "none"] = Field("probability", description=(
        "Rescale kept entries by 1/p (probability, the paper's Eq. 2), to the task vector's L1 norm (l1, "
        "mergekit 0.1.5) or not at all (none)."))
    normalize: bool | None = Field(None, description=(
        "Divide by the (agreeing) weights; default true for della, false for della-linear (as mergekit)."))

    @field_validator("epsilon", mode="before")
    @classmethod
    def _parse_eps(cls, v: Any) -> Any:
        return parse_layer_value(v)


class SceParams(VocabMergeParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0, description=(
        "Fraction of entries kept by variance across the models (1 = keep all)."))


# ---------------------------------------------------------------------------------------------------------
# wiring


def _gta_setup(graph: Graph, params: _GtaParams, ctx: Context, op: str):
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=1, op=op)
    params.per_model = resolve_per_model(params.per_model, inputs.names, ("weight", "density", "gamma", "epsilon"),
                                         op=op)
    if params.weights is not None and len(params.weights) != inputs.n:
        raise SurgeonError(f"{op}: --weights has {len(params.weights)} values for {inputs.n} models")
    check_unit_interval(params.density, "density")
    plan = check_compatible(inputs, params, op=op)
    return inputs, plan, num_layers(inputs.primary)


def _shared_weights(params: _GtaParams, n: int) -> list[float]:
    return list(params.weights) if params.weights is not None else [1.0] * n


def _breadcrumbs(graph: Graph, params: BreadcrumbsParams, ctx: Context, *, consensus: str, op: str) -> Graph:
    inputs, plan, n_layers = _gta_setup(graph, params, ctx, op)
    sw = _shared_weights(params, inputs.n)

    def make(name: str):
        w = model_values(params.per_model, "weight", inputs.names, name, n_layers, sw)
        dens = model_values(params.per_model, "density", inputs.names, name, n_layers, params.density)
        gam = model_values(params.per_model, "gamma", inputs.names, name, n_layers, params.gamma)
        lam = layer_value(params.scale, name, n_layers)

        def sparsify(i: int, tau: torch.Tensor) -> torch.Tensor:
            return tau * breadcrumbs_mask(tau, dens[i], gam[i])

        return lambda b, *vals: generalised_task_arithmetic(b, vals, w, sparsify, consensus=consensus,
                                                            normalize=params.normalize, scale=lam)

    g = merged_graph(inputs, params, plan, make, with_base=True, label=f"merge-{op.split()[-1]}")
    ctx.report(method=op.split()[-1], models=inputs.names, base=inputs.base_name, density=params.density,
               gamma=params.gamma, per_model=params.per_model)
    return g


@register("merge.breadcrumbs", BreadcrumbsParams, multi_model=True,
          summary="Model Breadcrumbs: drop outliers and small task-vector entries.")
def merge_breadcrumbs(graph: Graph, params: BreadcrumbsParams, ctx: Context) -> Graph:
    """Model Breadcrumbs: drop outliers and small entries of each task vector, sum."""
    return _breadcrumbs(graph, params, ctx, consensus="none", op="merge breadcrumbs")


@register("merge.breadcrumbs-ties", BreadcrumbsParams, multi_model=True,
          summary="Model Breadcrumbs with TIES sign election.")
def merge_breadcrumbs_ties(graph: Graph, params: BreadcrumbsParams, ctx: Context) -> Graph:
    """Model Breadcrumbs with TIES sign election."""
    return _breadcrumbs(graph, params, ctx, consensus="sum", op="merge breadcrumbs-ties")


def _della(graph: Graph, params: DellaParams, ctx: Context, *, consensus: str, op: str) -> Graph:
    inputs, plan, n_layers = _gta_setup(graph, params, ctx, op)
    sw = _shared_weights(params, inputs.n)
    normalize = params.normalize if params.normalize is not None else consensus != "none"
    seed = ctx.seed_for(params.seed)

    def make(name: str):
        w = model_values(params.per_model, "weight", inputs.names, name, n_layers, sw)
        dens = model_values(params.per_model, "density", inputs.names, name, n_layers, params.density)
        eps = model_values(params.per_model, "epsilon", inputs.names, name, n_layers, params.epsilon)
        lam = layer_value(params.scale, name, n_layers)
        for d, e in zip(dens, eps):
            if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
                raise SurgeonError(f"{op}: tensor {name!r}: density ± epsilon must lie in (0, 1), got density {d}, "
                                   f"epsilon {e}")

        def sparsify(i: int, tau: torch.Tensor) -> torch.Tensor:
            gen = torch.Generator().manual_seed(tensor_seed(seed + i, name))
            return della_drop(tau, dens[i], eps[i], gen, rescale=params.rescale)

        return lambda b, *vals: generalised_task_arithmetic(b, vals, w, sparsify, consensus=consensus,
                                                            normalize=normalize, scale=lam)

    # check density ± epsilon for every tensor before anything is computed
    for t, kind in plan.items():
        if kind == "merge":
            make(t)
    g = merged_graph(inputs, params, plan, make, with_base=True, label=f"merge-{op.split()[-1]}")
    ctx.report(method=op.split()[-1], models=inputs.names, base=inputs.base_name, density=params.density,
               epsilon=params.epsilon, seed=seed, rescale=params.rescale, normalize=normalize)
    return g


@register("merge.della", DellaParams, multi_model=True,
          summary="DELLA: magnitude-ranked random drop, rescale, TIES election.")
def merge_della(graph: Graph, params: DellaParams, ctx: Context) -> Graph:
    """DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES election, disjoint mean."""
    return _della(graph, params, ctx, consensus="sum", op="merge della")


@register("merge.della-linear", DellaParams, multi_model=True,
          summary="DELLA without sign election (weighted sum).")
def merge_della_linear(graph: Graph, params: DellaParams, ctx: Context) -> Graph:
    """DELLA without sign election: MagPrune, rescale, weighted sum."""
    return _della(graph, params, ctx, consensus="none", op="merge della-linear")


@register("merge.sce", SceParams, multi_model=True,
          summary="SCE: select by variance, weights from mean squares, erase signs.")
def merge_sce(graph: Graph, params: SceParams, ctx: Context) -> Graph:
    """SCE: select by variance, calculate weights from mean squares, erase minority signs, merge."""
    op = "merge sce"
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=1, op=op)
    plan = check_compatible(inputs, params, op=op)

    def make(name: str):
        return lambda b, *vals: sce_merge(b, vals, select_topk=params.select_topk)

    g = merged_graph(inputs, params, plan, make, with_base=True, label="merge-sce")
    ctx.report(method="sce", models=inputs.names, base=inputs.base_name, select_topk=params.select_topk)
    return g
