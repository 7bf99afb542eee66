"""Interpolations between checkpoints: SLERP, NuSLERP, Multi-SLERP, Karcher mean, Model Stock, NearSwap.

Pure tensor functions first (fp32 in, fp32 out), then one short ``apply`` per op. Semantics follow mergekit 0.1.5,
which is what users compare against (same inputs give the same outputs to fp32 rounding; see docs/merge.md):

- SLERP (Shoemake 1985): the whole tensor is one vector; θ = arccos(⟨v0/‖v0‖, v1/‖v1‖⟩),
  slerp = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, linear when |cos θ| > 0.9995. ``t`` may vary per layer and
  per tensor-name filter (mergekit's gradients).
- NuSLERP: SLERP of two models (or of their task vectors when a base is given) with t = w_2/(w_1 + w_2), over the
  flattened tensor, its rows, or its columns; a norm-keeping spherical step, not the unit-sphere one of SLERP.
- Multi-SLERP: barycentric interpolation on the hypersphere (tangent space at the weighted mean of the unit
  vectors, exponential map back, rescaled to the weighted mean norm).
- Karcher mean: the weighted Riemannian mean of the unit vectors (fixed-point iteration), times the weighted norm.
- Model Stock (Jang et al. 2024, arXiv 2403.19522, Eq. 4): t = N cos θ / (1 + (N − 1) cos θ) with cos θ the mean
  pairwise cosine of the task vectors, θ = t · mean(θ_i) + (1 − t) θ_0.
- NearSwap: w = clamp(t / |a − b|, 0, 1), θ = w·b + (1 − w)·a: take the other model's value where it is close.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, field_validator
from surgeon.ops.merge.inputs import (
    MergeParams,
    VocabMergeParams,
    check_compatible,
    check_weights,
    gather_inputs,
    merged_graph,
)
from surgeon.ops.merge.values import LayerValue, layer_value, num_layers, parse_float_list, parse_layer_value

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.registry import register

# ---------------------------------------------------------------------------------------------------------
# pure math


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (one vector each); linear when nearly collinear."""
    a, b = v0.float().reshape(-1), v1.float().reshape(-1)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, float(torch.dot(a, b)) / (na * nb)))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    return (ca * a + cb * b).reshape(v0.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, axis: str = "flat", eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation without normalising the result: per flattened tensor (``flat``), per row
    (``rows``: each output row is a vector) or per column (``columns``)."""
    shape = v0.shape
    a, b = v0.float(), v1.float()
    if axis == "flat" or a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif axis == "columns":
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.where(collinear, torch.ones_like(sin), sin)
    out = torch.where(collinear, (1 - t) * a + t * b, out)
    if axis == "columns" and v0.dim() >= 2:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(values: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (of task vectors when ``base`` is given)."""
    if len(values) == 1:
        return values[0].float()
    x = torch.stack([v.float() for v in values])
    if base is not None:
        x -= base.float()
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor([float(v) for v in weights], dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if x.shape[0] == 2:  # antipodal pair: linear fallback
            out = x[0] * w[0] + x[1] * w[1]
            return out + base.float() if base is not None else out
        raise SurgeonError("multislerp: the weighted mean of the unit task vectors is zero (antipodal inputs with "
                           "balancing weights); change the weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w[:, None]).sum(0)
    step_norm = torch.linalg.vector_norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    return out + base.float() if base is not None else out


def karcher_mean(values: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean of the unit vectors, scaled by Σ α_i ‖v_i‖."""
    if len(values) == 1:
        return values[0].float()
    flat = [v.float().reshape(-1) for v in values]
    norms = [float(torch.linalg.vector_norm(v)) for v in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(values[0].shape)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mean += ai * u
    mn = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            dot = max(-1.0, min(1.0, float(torch.dot(mean, u))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += (ai * theta / math.sin(theta)) * (u - dot * mean)
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean = mean / un
    scale = sum(al * n for al, n in zip(alphas, norms))
    return (scale * mean).reshape(values[0].shape)


def model_stock(base: torch.Tensor, values: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Eq. 4): interpolate the fine-tunes' average toward the base by t = N cos θ / (1 + (N−1) cos θ)."""
    shape = base.shape
    b = base.float()
    if filter_wise:
        b = b.unsqueeze(0) if b.dim() == 1 else b
        ws = [v.float().reshape(b.shape) for v in values]
    else:
        b = b.reshape(-1)
        ws = [v.float().reshape(-1) for v in values]
    offsets = [w - b for w in ws]
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            denom = (torch.linalg.vector_norm(oa, dim=-1) * torch.linalg.vector_norm(ob, dim=-1)).clamp(min=1e-6)
            cosines.append(((oa * ob).sum(-1) / denom).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * b).reshape(shape)


def nearswap(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w = clamp(t / |a − b|, 0, 1) per entry; w·b + (1 − w)·a."""
    a, b = a.float(), b.float()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


# ---------------------------------------------------------------------------------------------------------
# params


class _WeightsParams(VocabMergeParams):
    weights: list[float] | None = Field(None, description="One weight per model, in order (default: all 1).")

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, v: Any) -> Any:
        return parse_float_list(v)


class SlerpParams(VocabMergeParams):
    t: LayerValue = Field(0.5, description=(
        "Interpolation factor from the base (t = 0) to the other model (t = 1): a number, a list over layers "
        "(a gradient, as mergekit's), or {pattern: value} (e.g. {self_attn: [0, 0.5, 1], mlp: [1, 0.5, 0], "
        "default: 0.5})."))
    dot_threshold: float = Field(0.9995, description="Above this |cos θ| the two tensors are interpolated linearly.")

    @field_validator("t", mode="before")
    @classmethod
    def _parse_t(cls, v: Any) -> Any:
        return parse_layer_value(v)


class NuslerpParams(_WeightsParams):
    axis: str = Field("flat", pattern="^(flat|rows|columns)$", description=(
        "Vectors interpolated: the flattened tensor (flat, mergekit's default nuslerp_flatten), each row (rows) "
        "or each column (columns, mergekit's nuslerp_row_wise)."))


class MultislerpParams(_WeightsParams):
    normalize_weights: bool = Field(True, description="Divide the weights by their sum.")


class KarcherParams(_WeightsParams):
    max_iter: int = Field(10, ge=1, description="Fixed-point iterations of the Karcher mean.")
    tol: float = Field(1e-5, gt=0, description="Stop when the tangent step is shorter than this.")


class ModelStockParams(VocabMergeParams):
    filter_wise: bool = Field(False, description="One interpolation ratio per row instead of per tensor.")


class NearswapParams(VocabMergeParams):
    t: LayerValue = Field(0.001, description=(
        "Similarity threshold: entries closer than t take the other model's value; a number, a list over layers "
        "or {pattern: value}."))

    @field_validator("t", mode="before")
    @classmethod
    def _parse_t(cls, v: Any) -> Any:
        return parse_layer_value(v)


# ---------------------------------------------------------------------------------------------------------
# ops


def _pair(graph: Graph, params: MergeParams, ctx: Context, op: str):
    """Two endpoints: the base and one model, or two models."""
    inputs = gather_inputs(graph, params, ctx, need_base=False, min_models=1, op=op)
    if inputs.base is not None:
        if inputs.n != 1:
            raise SurgeonError(f"{op}: needs the base and exactly one other model, got {inputs.n} besides the base")
    elif inputs.n != 2:
        raise SurgeonError(f"{op}: needs exactly two models (or --base and one model), got {inputs.n}")
    plan = check_compatible(inputs, params, op=op)
    return inputs, plan, num_layers(inputs.primary)


@register("merge.slerp", SlerpParams, multi_model=True,
          summary="SLERP of two models, t per layer and per filter (gradients).")
def merge_slerp(graph: Graph, params: SlerpParams, ctx: Context) -> Graph:
    """Spherical interpolation of two models, t per layer/filter (base = the t = 0 end)."""
    op = "merge slerp"
    inputs, plan, n_layers = _pair(graph, params, ctx, op)
    with_base = inputs.base is not None

    def make(name: str):
        t = layer_value(params.t, name, n_layers)
        return lambda a, b: slerp(t, a, b, dot_threshold=params.dot_threshold)

    g = merged_graph(inputs, params, plan, make, with_base=with_base, label="merge-slerp")
    ctx.report(method="slerp", models=([inputs.base_name] if with_base else []) + inputs.names, t=params.t)
    return g


@register("merge.nuslerp", NuslerpParams, multi_model=True,
          summary="NuSLERP: spherical interpolation of two models or task vectors.")
def merge_nuslerp(graph: Graph, params: NuslerpParams, ctx: Context) -> Graph:
    """NuSLERP of two models (of their task vectors with --base), t = w_2 / (w_1 + w_2)."""
    op = "merge nuslerp"
    inputs = gather_inputs(graph, params, ctx, need_base=False, min_models=2, op=op)
    if inputs.n != 2:
        raise SurgeonError(f"{op}: needs exactly two models besides the base, got {inputs.n}")
    weights = check_weights(params.weights, 2, op=op)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    plan = check_compatible(inputs, params, op=op)
    with_base = inputs.base is not None

    def make(name: str):
        if with_base:
            return lambda b, x, y: b.float() + nuslerp(t, x.float() - b.float(), y.float() - b.float(),
                                                       axis=params.axis)
        return lambda x, y: nuslerp(t, x, y, axis=params.axis)

    g = merged_graph(inputs, params, plan, make, with_base=with_base, label="merge-nuslerp")
    ctx.report(method="nuslerp", models=inputs.names, base=inputs.base_name, t=t, axis=params.axis)
    return g


@register("merge.multislerp", MultislerpParams, multi_model=True,
          summary="Multi-SLERP: barycentric interpolation on the hypersphere.")
def merge_multislerp(graph: Graph, params: MultislerpParams, ctx: Context) -> Graph:
    """Barycentric spherical interpolation of any number of models (of task vectors with --base)."""
    op = "merge multislerp"
    inputs = gather_inputs(graph, params, ctx, need_base=False, min_models=1, op=op)
    weights = check_weights(params.weights, inputs.n, op=op)
    plan = check_compatible(inputs, params, op=op)
    with_base = inputs.base is not None

    def make(name: str):
        if with_base:
            return lambda b, *vals: multislerp(vals, weights, base=b, normalize_weights=params.normalize_weights)
        return lambda *vals: multislerp(vals, weights, normalize_weights=params.normalize_weights)

    g = merged_graph(inputs, params, plan, make, with_base=with_base, label="merge-multislerp")
    ctx.report(method="multislerp", models=inputs.names, base=inputs.base_name, weights=weights)
    return g


@register("merge.karcher", KarcherParams, multi_model=True,
          summary="Karcher (Riemannian) mean of the models on the sphere.")
def merge_karcher(graph: Graph, params: KarcherParams, ctx: Context) -> Graph:
    """Karcher mean on the sphere of all inputs (a --base counts as one more input, as in mergekit)."""
    op = "merge karcher"
    inputs = gather_inputs(graph, params, ctx, need_base=False, min_models=1, op=op)
    n_points = inputs.n + (1 if inputs.base is not None else 0)
    weights = check_weights(params.weights, n_points, op=op) if params.weights is not None else [1.0] * n_points
    alphas = [w / sum(weights) for w in weights]
    plan = check_compatible(inputs, params, op=op)
    with_base = inputs.base is not None

    def make(name: str):
        return lambda *vals: karcher_mean(vals, alphas, max_iter=params.max_iter, tol=params.tol)

    g = merged_graph(inputs, params, plan, make, with_base=with_base, label="merge-karcher")
    ctx.report(method="karcher", models=([inputs.base_name] if with_base else []) + inputs.names, weights=alphas)
    return g


@register("merge.model-stock", ModelStockParams, multi_model=True,
          summary="Model Stock: fine-tunes' average pulled toward the base.")
def merge_model_stock(graph: Graph, params: ModelStockParams, ctx: Context) -> Graph:
    """Model Stock: average of ≥ 2 fine-tunes pulled toward the base by their mean pairwise angle."""
    op = "merge model-stock"
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=2, op=op)
    plan = check_compatible(inputs, params, op=op)

    def make(name: str):
        return lambda b, *vals: model_stock(b, vals, filter_wise=params.filter_wise)

    g = merged_graph(inputs, params, plan, make, with_base=True, label="merge-model-stock")
    ctx.report(method="model-stock", models=inputs.names, base=inputs.base_name, filter_wise=params.filter_wise)
    return g


@register("merge.nearswap", NearswapParams, multi_model=True,
          summary="NearSwap: take the other model's values where they are close.")
def merge_nearswap(graph: Graph, params: NearswapParams, ctx: Context) -> Graph:
    """NearSwap: take the other model's entries where they are within t of the base's."""
    op = "merge nearswap"
    inputs, plan, n_layers = _pair(graph, params, ctx, op)
    if inputs.base is None:
        raise SurgeonError(f"{op}: needs --base (the model whose values are kept where the two differ)")

    def make(name: str):
        t = layer_value(params.t, name, n_layers)
        return lambda a, b: nearswap(t, a, b)

    g = merged_graph(inputs, params, plan, make, with_base=True, label="merge-nearswap")
    ctx.report(method="nearswap", base=inputs.base_name, models=inputs.names, t=params.t)
    return g
