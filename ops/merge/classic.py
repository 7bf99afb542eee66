"""Classic merges: linear (model soups), task arithmetic, TIES, DARE (ALGORITHMS.md §3.1).

Pure tensor functions first (fp32 in, fp32 out, testable without files; the shared sparsifiers live in
:mod:`surgeon.ops.merge.sparsify`), then the ops. Task arithmetic, TIES and DARE are one configured method,
:func:`merge_task_vectors`: each registered op is a preset of :class:`TaskArithmeticParams` whose
:meth:`~TaskArithmeticParams.method` names the sparsifier (none, magnitude trim, random drop), the sign consensus
and DARE's rescale. Conventions follow mergekit where users compare against it: TIES trims with
``k = int(density·numel)``, elects the sign of the *weighted* sum and divides by the agreeing weights; task
arithmetic does not normalise by default.

- Linear (Wortsman et al. 2022, arXiv 2203.05482): θ = Σ w_i θ_i / Σ w_i.
- Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): θ = θ_b + λ Σ w_i τ_i, τ_i = θ_i − θ_b.
- TIES (Yadav et al. 2023, arXiv 2306.01708): trim to the top-density |τ_i|, γ = sign(Σ w_i τ̂_i),
  τ_m = Σ_agree w_i τ̂_i / Σ_agree w_i, θ = θ_b + λ τ_m.
- DARE (Yu et al. 2024, arXiv 2311.03099): τ̃_i = τ_i ⊙ m_i / p with m_i ~ Bernoulli(p = density), then a
  linear sum or TIES; each tensor's RNG is seeded from (run seed + the op's seed offset, tensor name),
  independent of execution order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from surgeon.kernels.host_merge import available as host_merge_available
from surgeon.kernels.host_merge import ties_available as host_ties_available
from surgeon.ops.merge.inputs import (
    VocabMergeParams,
    check_compatible,
    check_weights,
    gather_inputs,
    merged_graph,
)
from surgeon.ops.merge.sparsify import (
    Election,
    check_unit_interval,
    chunked_disjoint_mean,
    dare_drop,
    disjoint_mean,
    tensor_seed,
    trim_mask,
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
from surgeon.tensorfile import HostArray

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------------------
# pure math


def linear_merge(values: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Σ w_i θ_i (/ Σ w_i when ``normalize``), accumulated in fp32."""
    import torch

    acc = torch.zeros(values[0].shape, dtype=torch.float32)
    for v, w in zip(values, weights):
        acc.add_(v.float(), alpha=float(w))
    total = float(sum(weights))
    if normalize and abs(total) > 1e-8:
        acc.div_(total)
    return acc


def linear_merge_host(values: Sequence[HostArray], weights: Sequence[float], *, normalize: bool = True) -> HostArray:
    """:func:`linear_merge` on raw storage, without torch and with the same bytes (the C kernel of
    :mod:`surgeon.kernels.host_merge`: one fused multiply-add per term, then the IEEE division)."""
    from surgeon.kernels.host_merge import weighted_sum

    total = float(sum(weights))
    divisor = total if normalize and abs(total) > 1e-8 else None
    data = weighted_sum([v.data for v in values], [v.dtype for v in values], weights, divisor)
    return HostArray(data, "float32", values[0].shape)


def task_arithmetic_host(base: HostArray, values: Sequence[HostArray], weights: Sequence[float], *,
                         scale: float = 1.0, normalize: bool = False) -> HostArray:
    """:func:`task_arithmetic` on raw storage, without torch and with the same bytes."""
    from surgeon.kernels import host_merge

    total = float(sum(weights))
    out = host_merge.task_arithmetic(base.data, base.dtype, [v.data for v in values], [v.dtype for v in values],
                                     weights, divisor=total if normalize and abs(total) > 1e-8 else None,
                                     scale=scale)
    return HostArray(out, "float32", base.shape)


def ties_merge_host(base: HostArray, values: Sequence[HostArray], weights: Sequence[float], *,
                    density: Sequence[float], scale: float, normalize: bool) -> HostArray:
    """:func:`ties_merge` (weighted election) on raw storage, without torch and with the same bytes
    (:mod:`surgeon.kernels.host_merge`); a non-finite task vector goes through :func:`ties_merge` for its error."""
    from surgeon.kernels import host_merge

    dtypes = [v.dtype for v in values]
    masks = host_merge.trim_masks(base.data, base.dtype, [v.data for v in values], dtypes, density)
    if masks is None:
        from surgeon.tensorfile import as_tensor

        ties_merge(as_tensor(base), [as_tensor(v) for v in values], weights, density=density, scale=scale,
                   normalize=normalize)
        raise SurgeonError("internal: a non-finite task vector passed the TIES trim")
    out = host_merge.ties_combine(base.data, base.dtype, [v.data for v in values], dtypes, masks, weights,
                                  scale=scale, normalize=normalize)
    return HostArray(out, "float32", base.shape)


def task_vectors(base: torch.Tensor, values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked τ_i = θ_i − θ_b in fp32, shape [n, *shape]."""
    import torch

    b = base.float()
    return torch.stack([v.float() - b for v in values])


def task_arithmetic(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float], *,
                    scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """θ_b + λ Σ w_i τ_i (the sum divided by Σ w_i when ``normalize``)."""
    import torch

    b = base.float()
    acc = torch.zeros_like(b)
    for v, w in zip(values, weights):
        acc.add_(v.float() - b, alpha=float(w))
    total = float(sum(weights))
    if normalize and abs(total) > 1e-8:
        acc.div_(total)
    return b.add_(acc, alpha=float(scale)) if scale != 1.0 else b + acc


def ties_merge(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float], *,
               density: float | Sequence[float],
               scale: float = 1.0, normalize: bool = True,
               election: Election = "weighted", chunk: int = 1 << 22) -> torch.Tensor:
    """θ_b + λ·disjoint_mean(trim(τ_i)).

    Memory: one trim mask (1 byte/entry) per model is computed from its full τ_i (the threshold is per tensor);
    the election and mean then run over ``chunk`` entries at a time, so temporaries stay small.
    """
    import torch

    b = base.float().reshape(-1)
    densities = [density] * len(values) if isinstance(density, (int, float)) else list(density)
    masks = []
    for v, d in zip(values, densities):
        masks.append(trim_mask(v.float().reshape(-1) - b, d, overwrite=True))  # τ_i is a temporary
    out = torch.empty_like(b)
    flat = [v.reshape(-1) for v in values]
    for start in range(0, b.numel(), chunk):
        sl = slice(start, min(start + chunk, b.numel()))
        bb = b[sl]
        taus = torch.stack([(v[sl].float() - bb) * m[sl] for v, m in zip(flat, masks)])
        out[sl] = bb + scale * disjoint_mean(taus, weights, normalize=normalize, election=election)
    return out.reshape(base.shape)


def dare_merge(base: torch.Tensor, values: Sequence[torch.Tensor], weights: Sequence[float], *,
               density: float | Sequence[float],
               seed: int, name: str, scale: float = 1.0, consensus: Literal["none", "ties"] = "none",
               normalize: bool = False, rescale: bool = True,
               rescale_norm: Literal["probability", "l1"] = "probability",
               election: Election = "weighted") -> torch.Tensor:
    """DARE: drop-and-rescale each τ_i (one RNG stream per tensor and model), then sum (or TIES-elect)."""
    import torch

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


class LinearParams(_WeightsMixin):
    normalize: bool = Field(True, description="Divide by the sum of the weights.")

    def host_working_copies(self, n_inputs: int) -> int | None:
        """Largest-tensor-sized buffers besides the inputs when merging on the host kernel (the fp32 result)."""
        return 1


@dataclass(frozen=True)
class TaskVectorMethod:
    """One configuration of task arithmetic over τ_i = θ_i − θ_b: how each τ_i is sparsified (none; magnitude:
    TIES trim; random: DARE drop), whether signs are elected (ties: disjoint mean), how DARE rescales."""

    sparsify: Literal["none", "magnitude", "random"] = "none"
    consensus: Literal["none", "ties"] = "none"
    election: Election = "weighted"
    rescale: bool = True
    rescale_norm: Literal["probability", "l1"] = "probability"


class TaskArithmeticParams(_WeightsMixin):
    """The task-arithmetic family's knobs; each registered op is a preset (see :meth:`method`) of
    :func:`merge_task_vectors`. Plain task arithmetic: no sparsification, no sign election."""

    scale: LayerValue = Field(1.0, description=(
        "λ multiplying the summed task vectors: a number, a list over layers, or {pattern: value}."))
    normalize: bool = Field(False, description="Divide the summed task vectors by the sum of the weights.")

    op_name: ClassVar[str] = "task-arithmetic"  # the op (after "merge "), the report's method
    node_label: ClassVar[str] = "merge-ta"
    per_model_keys: ClassVar[tuple[str, ...]] = ("weight",)
    reported: ClassVar[tuple[str, ...]] = ("scale", "normalize")  # report fields after models, base, weights

    @field_validator("scale", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return parse_layer_value(v)

    def method(self) -> TaskVectorMethod:
        return TaskVectorMethod()

    def host_working_copies(self, n_inputs: int) -> int | None:
        """Largest-tensor-sized buffers besides the inputs on the host kernel (the fp32 result), or None when
        this preset runs on torch."""
        return 1 if type(self).method is TaskArithmeticParams.method else None


class TiesParams(TaskArithmeticParams):
    """TIES: magnitude trim, sign election, disjoint mean."""

    density: LayerValue = Field(0.5, description=(
        "Fraction of each task vector kept (largest magnitudes): a number in [0, 1], a list over layers, "
        "or {pattern: value}."))
    normalize: bool = Field(True, description="Disjoint mean: divide by the weights of the agreeing models.")
    election: Election = Field("weighted", description=(
        "Sign election: on Σ w_i τ̂_i (weighted, mergekit's default 'sum'), on Σ τ̂_i (unweighted, the paper's "
        "Eq. 2), or by the majority of signs (count, mergekit's consensus_method: count)."))

    op_name: ClassVar[str] = "ties"
    node_label: ClassVar[str] = "merge-ties"

    def host_working_copies(self, n_inputs: int) -> int | None:
        """Largest-tensor-sized buffers besides the inputs on the host kernels (|τ| and the sort's int32 index,
        the result, the masks), or None when this TIES runs on torch (another election, over 5 models)."""
        from surgeon.kernels.host_merge import MAX_TIES_MODELS

        return 3 if self.election == "weighted" and n_inputs - 1 <= MAX_TIES_MODELS else None
    per_model_keys: ClassVar[tuple[str, ...]] = ("weight", "density")
    reported: ClassVar[tuple[str, ...]] = ("density", "scale", "election", "normalize")

    @field_validator("density", mode="before")
    @classmethod
    def _parse_density(cls, v: Any) -> Any:
        return parse_layer_value(v)

    @model_validator(mode="after")
    def _check(self):
        check_unit_interval(self.density, "density")
        return self

    def method(self) -> TaskVectorMethod:
        return TaskVectorMethod("magnitude", "ties", self.election)


class DareParams(TaskArithmeticParams):
    """DARE: random drop and rescale, then a sum (dare_linear) or TIES election (dare_ties)."""

    density: LayerValue = Field(0.5, description=(
        "Keep probability p of each task-vector entry (drop rate 1 − p): a number in (0, 1], a list over "
        "layers, or {pattern: value}."))
    seed: int = Field(0, description=(
        "Seed of the random masks, added to the run's seed (a recipe's top-level seed; 0 from the command line). "
        "Each tensor's mask depends on that sum and the tensor's name only."))
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

    op_name: ClassVar[str] = "dare"
    node_label: ClassVar[str] = "merge-dare"
    per_model_keys: ClassVar[tuple[str, ...]] = ("weight", "density")
    reported: ClassVar[tuple[str, ...]] = ("density", "scale", "seed", "consensus", "normalize")

    @field_validator("density", mode="before")
    @classmethod
    def _parse_density(cls, v: Any) -> Any:
        return parse_layer_value(v)

    @model_validator(mode="after")
    def _check(self):
        check_unit_interval(self.density, "density", low_open=True)
        return self

    def method(self) -> TaskVectorMethod:
        return TaskVectorMethod("random", self.consensus, self.election, self.rescale, self.rescale_norm)


# ---------------------------------------------------------------------------------------------------------
# ops


@register("merge.linear", LinearParams, multi_model=True, torch_free=True,
          summary="Weighted average of checkpoints.")
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

    def make_host(name: str):
        if not host_merge_available([m[name].dtype_name for m in inputs.graphs]):
            return None
        w = model_values(per_model, "weight", inputs.names, name, n_layers, weights)
        return lambda *vals: linear_merge_host(vals, w, normalize=params.normalize)

    g = merged_graph(inputs, params, plan, make, with_base=False, label="merge-linear", make_host=make_host)
    ctx.report(method="linear", models=inputs.names, weights=weights, normalize=params.normalize,
               merged_tensors=sum(1 for k in plan.values() if k == "merge"))
    return g


def _densities_for(params: TaskArithmeticParams, inputs, name: str, n_layers: int) -> list[float]:
    dens = model_values(params.per_model, "density", inputs.names, name, n_layers, params.density)  # type: ignore[attr-defined]
    for d in dens:
        if not 0.0 <= d <= 1.0:
            raise SurgeonError(f"{type(params).__name__}: density of tensor {name!r} is {d}, expected [0, 1]")
    return dens


def _tensor_merge(m: TaskVectorMethod, params: TaskArithmeticParams, name: str, w: list[float], lam: float,
                  density: list[float] | None, seed: int):
    """``fn(base, *values)`` for one tensor under the configured method (the kernels above)."""
    if m.sparsify == "none" and m.consensus == "none":
        return lambda base, *vals: task_arithmetic(base, vals, w, scale=lam, normalize=params.normalize)
    if m.sparsify == "magnitude" and m.consensus == "ties":
        return lambda base, *vals: ties_merge(base, vals, w, density=density, scale=lam,
                                              normalize=params.normalize, election=m.election)
    if m.sparsify == "random":
        return lambda base, *vals: dare_merge(base, vals, w, density=density, seed=seed, name=name, scale=lam,
                                              consensus=m.consensus, normalize=params.normalize,
                                              rescale=m.rescale, rescale_norm=m.rescale_norm, election=m.election)
    raise SurgeonError(f"internal: no task-vector merge for sparsify={m.sparsify}, consensus={m.consensus}")


def merge_task_vectors(graph: Graph, params: TaskArithmeticParams, ctx: Context) -> Graph:
    """θ = θ_b + λ·merge(sparsify(w_i τ_i)) as configured by ``params.method()`` (task arithmetic, TIES, DARE)."""
    op = f"merge {params.op_name}"
    inputs = gather_inputs(graph, params, ctx, need_base=True, min_models=1, op=op)
    weights = check_weights(params.weights, inputs.n, op=op)
    params.per_model = resolve_per_model(params.per_model, inputs.names, params.per_model_keys, op=op)
    plan = check_compatible(inputs, params, op=op)
    n_layers = num_layers(inputs.primary)
    method = params.method()
    seed = ctx.seed_for(getattr(params, "seed", 0))

    def make(name: str):
        density = _densities_for(params, inputs, name, n_layers) if method.sparsify != "none" else None
        lam = layer_value(params.scale, name, n_layers)
        w = model_values(params.per_model, "weight", inputs.names, name, n_layers, weights)
        return _tensor_merge(method, params, name, w, lam, density, seed)

    def make_host(name: str):
        if params.host_working_copies(inputs.n + 1) is None:
            return None
        dtypes = [inputs.base[name].dtype_name, *(m[name].dtype_name for m in inputs.graphs)]
        lam = layer_value(params.scale, name, n_layers)
        w = model_values(params.per_model, "weight", inputs.names, name, n_layers, weights)
        if method.sparsify == "none":
            if not host_merge_available(dtypes):
                return None
            return lambda base, *vals: task_arithmetic_host(base, vals, w, scale=lam, normalize=params.normalize)
        if not host_ties_available(dtypes, inputs.n):
            return None
        density = _densities_for(params, inputs, name, n_layers)
        return lambda base, *vals: ties_merge_host(base, vals, w, density=density, scale=lam,
                                                   normalize=params.normalize)

    g = merged_graph(inputs, params, plan, make, with_base=True, label=params.node_label, make_host=make_host)
    extra = {k: seed if k == "seed" else getattr(params, k) for k in params.reported}
    ctx.report(method=params.op_name, models=inputs.names, base=inputs.base_name, weights=weights, **extra)
    return g


@register("merge.task-arithmetic", TaskArithmeticParams, multi_model=True, torch_free=True,
          summary="Base + λ·Σ task vectors (Ilharco et al. 2023).")
def merge_task_arithmetic(graph: Graph, params: TaskArithmeticParams, ctx: Context) -> Graph:
    """θ = θ_b + λ Σ w_i (θ_i − θ_b); --scale may vary per layer or per role."""
    return merge_task_vectors(graph, params, ctx)


@register("merge.ties", TiesParams, multi_model=True, torch_free=True,
          summary="TIES: trim, elect sign, disjoint mean (Yadav et al. 2023).")
def merge_ties(graph: Graph, params: TiesParams, ctx: Context) -> Graph:
    """Keep the top-density |τ_i| per tensor, elect a sign per entry, average the agreeing entries, add λ× to the base."""
    return merge_task_vectors(graph, params, ctx)


@register("merge.dare", DareParams, multi_model=True,
          summary="DARE: random drop and rescale of task vectors (Yu et al. 2024).")
def merge_dare(graph: Graph, params: DareParams, ctx: Context) -> Graph:
    """Drop each task-vector entry with probability 1 − density, rescale by 1/density, then sum (or TIES with --consensus ties)."""
    return merge_task_vectors(graph, params, ctx)
