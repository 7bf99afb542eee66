"""Classic merges: linear (model soups), task arithmetic, TIES, DARE (ALGORITHMS.md §3.1).

Pure tensor functions first (fp32 in, fp32 out, testable without files), then one short ``apply`` per op that
wires them into lazy graph nodes. Conventions follow mergekit where users compare against it: TIES trims with
``k = int(density·numel)``, elects the sign of the *weighted* sum and divides by the agreeing weights; task
arithmetic does not normalise by default.

- Linear (Wortsman et al. 2022, arXiv 2203.05482): θ = Σ w_i θ_i / Σ w_i.
- Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): θ = θ_b + λ Σ w_i τ_i, τ_i = θ_i − θ_b.
- TIES (Yadav et al. 2023, arXiv 2306.01708): trim to the top-density |τ_i|, γ = sign(Σ w_i τ̂_i),
  τ_m = Σ_agree w_i τ̂_i / Σ_agree w_i, θ = θ_b + λ τ_m.
- DARE (Yu et al. 2024, arXiv 2311.03099): τ̃_i = τ_i ⊙ m_i / p with m_i ~ Bernoulli(p = density), then a
  linear sum or TIES; each tensor's RNG is seeded from (seed, tensor name), independent of execution order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from surgeon.kernels.select import kth_smallest
from surgeon.ops.merge.inputs import (
    VocabMergeParams,
    check_compatible,
    check_weights,
    gather_inputs,
    merged_graph,
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


def linear_merge(values: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Σ w_i θ_i (/ Σ w_i when ``normalize``), accumulated in fp32."""
    acc = torch.zeros(values[0].shape, dtype=torch.float32)
    for v, w in zip(values, weights):
        acc.add_(v.float(), alpha=float(w))
    total = float(sum(weights))
    if normalize and abs(total) > 1e-8:
        acc.div_(total)
    return acc


def task_vectors(base: torch.Tensor, values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked τ_i = θ_i − θ_b in fp32, shape [n, *shape]."""
    b = base.float()
    return torch.stack([v.float() - b for v in values])


def task_arithmetic(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float], *,
                    scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """θ_b + λ Σ w_i τ_i (the sum divided by Σ w_i when ``normalize``)."""
    b = base.float()
    acc = torch.zeros_like(b)
    for v, w in zip(values, weights):
        acc.add_(v.float() - b, alpha=float(w))
    total = float(sum(weights))
    if normalize and abs(total) > 1e-8:
        acc.div_(total)
    return b.add_(acc, alpha=float(scale)) if scale != 1.0 else b + acc


def trim_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``k = int(density·numel)`` largest |δ| (TIES "trim").

    The k-th largest |δ| comes from the O(n) radix selection of :mod:`surgeon.kernels.select` (no sort, no index
    tensor). Entries tied at a non-zero threshold are chosen as ``torch.argsort(|δ|, descending=True)[:k]``
    chooses them (mergekit's rule; continuous task vectors have practically no such ties); ties at zero (common:
    a tensor a fine-tune left unchanged) are taken in flat order without sorting, since zeros add nothing."""
    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool)
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    kth = kth_smallest(delta, n - k + 1, absolute=True)
    a = delta.detach().reshape(-1).abs()
    mask = a > kth.value
    need = k - (n - kth.n_less - kth.n_equal)  # how many entries equal to the threshold to keep
    if need == kth.n_equal:
        mask |= a == kth.value
    elif need > 0 and kth.value == 0.0:
        zeros = a == 0
        mask |= zeros & (zeros.cumsum(0) <= need)
    elif need > 0:
        mask = torch.zeros_like(mask)
        mask[torch.argsort(a, descending=True)[:k]] = True
    return mask.reshape(delta.shape)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = int(density·numel)`` largest |δ| (see :func:`trim_mask`), zero the rest."""
    if density >= 1.0:
        return delta
    return delta * trim_mask(delta, density)


def sign_election(weighted: torch.Tensor, *, method: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """γ = sign of Σ_i (weighted τ̂_i) per element (+1 on ties), or of the count of signs Σ_i sign(w_i τ̂_i)."""
    s = weighted.sum(0) if method == "sum" else torch.sign(weighted).sum(0)
    return torch.where(s >= 0, 1.0, -1.0)


Election = Literal["weighted", "unweighted", "count"]


def disjoint_mean(deltas: torch.Tensor, weights: Sequence[float], *, normalize: bool = True,
                  election: Election = "weighted") -> torch.Tensor:
    """TIES disjoint merge of trimmed task vectors ``deltas`` [n, ...]: Σ_agree w τ̂ / Σ_agree w (0 if none).

    ``election``: sign of Σ w_i τ̂_i (weighted: mergekit's ``sum``), of Σ τ̂_i (unweighted: the paper's Eq. 2), or
    the majority of the signs of w_i τ̂_i (count: mergekit's ``consensus_method: count``; zeros do not vote).
    """
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if election == "count":
        gamma = sign_election(weighted, method="count")
    else:
        gamma = sign_election(weighted if election == "weighted" else deltas)
    agree = torch.sign(weighted) == gamma
    mixed = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1.0
        mixed = mixed / divisor
    return mixed


def chunked_disjoint_mean(deltas: torch.Tensor, weights: Sequence[float], *, normalize: bool,
                          election: Election = "weighted", chunk: int = 1 << 22) -> torch.Tensor:
    """:func:`disjoint_mean` over ``chunk`` entries at a time (the same numbers; temporaries stay small)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32)
    for start in range(0, flat.shape[1], chunk):
        sl = slice(start, min(start + chunk, flat.shape[1]))
        out[sl] = disjoint_mean(flat[:, sl], weights, normalize=normalize, election=election)
    return out.reshape(deltas.shape[1:])


def ties_merge(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float], *,
               density: float | Sequence[float],
               scale: float = 1.0, normalize: bool = True,
               election: Election = "weighted", chunk: int = 1 << 22) -> torch.Tensor:
    """θ_b + λ·disjoint_mean(trim(τ_i)).

    Memory: one trim mask (1 byte/entry) per model is computed from its full τ_i (the threshold is per tensor);
    the election and mean then run over ``chunk`` entries at a time, so temporaries stay small.
    """
    b = base.float().reshape(-1)
    densities = [density] * len(values) if isinstance(density, (int, float)) else list(density)
    masks = []
    for v, d in zip(values, densities):
        tau = v.float().reshape(-1) - b
        masks.append(trim_mask(tau, d))
        del tau
    out = torch.empty_like(b)
    flat = [v.reshape(-1) for v in values]
    for start in range(0, b.numel(), chunk):
        sl = slice(start, min(start + chunk, b.numel()))
        bb = b[sl]
        taus = torch.stack([(v[sl].float() - bb) * m[sl] for v, m in zip(flat, masks)])
        out[sl] = bb + scale * disjoint_mean(taus, weights, normalize=normalize, election=election)
    return out.reshape(base.shape)


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit RNG seed from (global seed, tensor name): the same tensor gets the same mask in any order."""
    h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def l1_rescale(kept: torch.Tensor, full: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled so that its L1 norm equals ``full``'s (mergekit's ``rescale`` for DARE/DELLA); unchanged
    when either norm is below ``eps``."""
    before, after = float(full.abs().sum()), float(kept.abs().sum())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True,
              rescale_norm: Literal["probability", "l1"] = "probability") -> torch.Tensor:
    """τ ⊙ m, m ~ Bernoulli(p = density), rescaled by 1/p (the paper's Eq. 3) or to τ's L1 norm (mergekit)."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    out = delta * keep
    if not rescale:
        return out
    if rescale_norm == "l1":
        return l1_rescale(out, delta)
    return out / density if density > 0 else out


def dare_merge(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float], *,
               density: float | Sequence[float],
               seed: int, name: str, scale: float = 1.0, consensus: Literal["none", "ties"] = "none",
               normalize: bool = False, rescale: bool = True,
               rescale_norm: Literal["probability", "l1"] = "probability",
               election: Election = "weighted") -> torch.Tensor:
    """DARE: drop-and-rescale each τ_i (one RNG stream per tensor and model), then sum (or TIES-elect)."""
    taus = task_vectors(base, values)
    densities = [density] * len(values) if isinstance(density, (int, float)) else list(density)
    for i in range(taus.shape[0]):
        g = torch.Generator().manual_seed(tensor_seed(seed + i, name))
        taus[i] = dare_drop(taus[i], densities[i], g, rescale=rescale, rescale_norm=rescale_norm)
    if consensus == "ties":
        mixed = chunked_disjoint_mean(taus, weights, normalize=normalize, election=election)
    else:
        w = torch.tensor([float(x) for x in weights]).reshape(-1, *([1] * (taus.dim() - 1)))
        mixed = (taus * w).sum(0)
        total = float(sum(weights))
        if normalize and abs(total) > 1e-8:
            mixed = mixed / total
    return base.float() + scale * mixed


# ---------------------------------------------------------------------------------------------------------
# params


def _weights_field():
    return Field(None, description="One weight per model, in order (default: all 1).")


class _WeightsMixin(VocabMergeParams):
    weights: list[float] | None = _weights_field()
    per_model: dict[str, dict[str, LayerValue]] = per_model_field()

    @field_validator("per_model", mode="before")
    @classmethod
    def _parse_per_model(cls, v: Any) -> Any:
        return parse_layer_value(v) if isinstance(v, str) else v

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, v: Any) -> Any:
        return parse_float_list(v)


def check_unit_interval(v: Any, what: str, *, low_open: bool = False) -> None:
    """Every number in ``v`` (a float, a per-layer list or a per-pattern mapping) lies in [0, 1] (or (0, 1])."""
    vals: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        else:
            vals.append(float(x))

    walk(v)
    for x in vals:
        if not (0.0 < x <= 1.0 if low_open else 0.0 <= x <= 1.0):
            raise ValueError(f"{what} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {x}")


class LinearParams(_WeightsMixin):
    normalize: bool = Field(True, description="Divide by the sum of the weights.")


class TaskArithmeticParams(_WeightsMixin):
    scale: LayerValue = Field(1.0, description=(
        "λ multiplying the summed task vectors: a number, a list over layers, or {pattern: value}."))
    normalize: bool = Field(False, description="Divide the summed task vectors by the sum of the weights.")

    @field_validator("scale", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return parse_layer_value(v)


class TiesParams(TaskArithmeticParams):
    density: LayerValue = Field(0.5, description=(
        "Fraction of each task vector kept (largest magnitudes): a number in [0, 1], a list over layers, "
        "or {pattern: value}."))
    normalize: bool = Field(True, description="Disjoint mean: divide by the weights of the agreeing models.")
    election: Election = Field("weighted", description=(
        "Sign election: on Σ w_i τ̂_i (weighted, mergekit's default 'sum'), on Σ τ̂_i (unweighted, the paper's "
        "Eq. 2), or by the majority of signs (count, mergekit's consensus_method: count)."))

    @field_validator("density", mode="before")
    @classmethod
    def _parse_density(cls, v: Any) -> Any:
        return parse_layer_value(v)

    @model_validator(mode="after")
    def _check(self):
        check_unit_interval(self.density, "density")
        return self


class DareParams(TaskArithmeticParams):
    density: LayerValue = Field(0.5, description=(
        "Keep probability p of each task-vector entry (drop rate 1 − p): a number in (0, 1], a list over "
        "layers, or {pattern: value}."))
    seed: int = Field(0, description="Seed of the random masks (each tensor's mask depends on seed and name only).")
    consensus: Literal["none", "ties"] = Field("none", description=(
        "After dropping: sum the task vectors (none = dare_linear) or TIES sign election (ties = dare_ties)."))
    rescale: bool = Field(True, description="Rescale the kept entries (DARE's rescale).")
    rescale_norm: Literal["probability", "l1"] = Field("probability", description=(
        "How kept entries are rescaled: by 1/p (probability, the paper's Eq. 3) or so that each task vector keeps "
        "its L1 norm (l1, what mergekit 0.1.5 does)."))
    election: Election = Field("weighted", description=(
        "Sign election with --consensus ties: weighted (mergekit's sum), unweighted (the TIES paper) or count."))
    normalize: bool = Field(False, description=(
        "Divide by the (agreeing) weights. Off by default, as mergekit's dare_ties and dare_linear; with "
        "--consensus ties and --density 1 the result then equals mergekit's dare_ties exactly."))

    @field_validator("density", mode="before")
    @classmethod
    def _parse_density(cls, v: Any) -> Any:
        return parse_layer_value(v)

    @model_validator(mode="after")
    def _check(self):
        check_unit_interval(self.density, "density", low_open=True)
        return self


# ---------------------------------------------------------------------------------------------------------
# ops


@register("merge.linear", LinearParams, multi_model=True)
def merge_linear(graph: Graph, params: LinearParams, ctx: Context) -> Graph:
    """θ = Σ w_i θ_i / Σ w_i over the models (a --base, if given, only supplies tensors that are not merged)."""
    inputs = gather_inputs(graph, params, ctx, need_base=False, min_models=1, op="merge linear")
    # a base, if given, is only where unmerged tensors come from; the average is over the models
    inputs.primary = inputs.graphs[0] if inputs.base is None else inputs.base
    weights = check_weights(params.weights, inputs.n, op="merge linear")
    if abs(sum(weights)) < 1e-8 and params.normalize:
        raise SurgeonError("merge linear: the weights sum to 0; cannot normalise (pass --no-normalize)")
    per_model = resolve_per_model(params.per_model, inputs.names, ("weight",), op="merge linear")
    saved_base, inputs.base = inputs.base, None
    plan = check_compatible(inputs, params, op="merge linear")
    inputs.base = saved_base
    n_layers = num_layers(inputs.primary)

    def make(name: str):
        w = model_values(per_model, "weight", inputs.names, name, n_layers, weights)
        return lambda *vals: linear_merge(vals, w, normalize=params.normalize)

    g = merged_graph(inputs, params, plan, make, with_base=False, label="merge-linear")
    ctx.report(method="linear", models=inputs.names, weights=weights, normalize=params.normalize,
               merged_tensors=sum(1 for k in plan.values() if k == "merge"))
    return g


def _task_setup(graph: Graph, params: TaskArithmeticParams, ctx: Context, op: str):
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=1, op=op)
    weights = check_weights(params.weights, inputs.n, op=op)
    allowed = ("weight", "density") if isinstance(params, (TiesParams, DareParams)) else ("weight",)
    params.per_model = resolve_per_model(params.per_model, inputs.names, allowed, op=op)
    plan = check_compatible(inputs, params, op=op)
    n_layers = num_layers(inputs.primary)
    return inputs, weights, plan, n_layers


def _weights_for(params: TaskArithmeticParams, inputs, weights: list[float], name: str, n_layers: int) -> list[float]:
    return model_values(params.per_model, "weight", inputs.names, name, n_layers, weights)


def _densities_for(params: TiesParams | DareParams, inputs, name: str, n_layers: int) -> list[float]:
    dens = model_values(params.per_model, "density", inputs.names, name, n_layers, params.density)
    for d in dens:
        if not 0.0 <= d <= 1.0:
            raise SurgeonError(f"{type(params).__name__}: density of tensor {name!r} is {d}, expected [0, 1]")
    return dens


@register("merge.task-arithmetic", TaskArithmeticParams, multi_model=True)
def merge_task_arithmetic(graph: Graph, params: TaskArithmeticParams, ctx: Context) -> Graph:
    """θ = θ_b + λ Σ w_i (θ_i − θ_b); --scale may vary per layer or per role."""
    op = "merge task-arithmetic"
    inputs, weights, plan, n_layers = _task_setup(graph, params, ctx, op)

    def make(name: str):
        lam = layer_value(params.scale, name, n_layers)
        w = _weights_for(params, inputs, weights, name, n_layers)
        return lambda base, *vals: task_arithmetic(base, vals, w, scale=lam, normalize=params.normalize)

    g = merged_graph(inputs, params, plan, make, with_base=True, label="merge-ta")
    ctx.report(method="task-arithmetic", models=inputs.names, base=inputs.base_name, weights=weights,
               scale=params.scale, normalize=params.normalize)
    return g


@register("merge.ties", TiesParams, multi_model=True)
def merge_ties(graph: Graph, params: TiesParams, ctx: Context) -> Graph:
    """Keep the top-density |τ_i| per tensor, elect a sign per entry, average the agreeing entries, add λ× to the base."""
    op = "merge ties"
    inputs, weights, plan, n_layers = _task_setup(graph, params, ctx, op)
    resolved = {t: (_densities_for(params, inputs, t, n_layers), layer_value(params.scale, t, n_layers),
                    _weights_for(params, inputs, weights, t, n_layers)) for t, k in plan.items() if k == "merge"}

    def make(name: str):
        density, lam, w = resolved[name]
        return lambda base, *vals: ties_merge(base, vals, w, density=density, scale=lam,
                                              normalize=params.normalize, election=params.election)

    g = merged_graph(inputs, params, plan, make, with_base=True, label="merge-ties")
    ctx.report(method="ties", models=inputs.names, base=inputs.base_name, weights=weights, density=params.density,
               scale=params.scale, election=params.election, normalize=params.normalize)
    return g


@register("merge.dare", DareParams, multi_model=True)
def merge_dare(graph: Graph, params: DareParams, ctx: Context) -> Graph:
    """Drop each task-vector entry with probability 1 − density, rescale by 1/density, then sum (or TIES with --consensus ties)."""
    op = "merge dare"
    inputs, weights, plan, n_layers = _task_setup(graph, params, ctx, op)
    normalize = params.normalize
    seed = params.seed

    def make(name: str):
        density = _densities_for(params, inputs, name, n_layers)
        lam = layer_value(params.scale, name, n_layers)
        w = _weights_for(params, inputs, weights, name, n_layers)
        return lambda base, *vals: dare_merge(base, vals, w, density=density, seed=seed, name=name,
                                              scale=lam, consensus=params.consensus, normalize=normalize,
                                              rescale=params.rescale, rescale_norm=params.rescale_norm,
                                              election=params.election)

    g = merged_graph(inputs, params, plan, make, with_base=True, label="merge-dare")
    ctx.report(method="dare", models=inputs.names, base=inputs.base_name, weights=weights, density=params.density,
               scale=params.scale, seed=seed, consensus=params.consensus, normalize=normalize)
    return g
