"""Models built from layer slices: frankenmerges, depth up-scaling, and merges of layer ranges (mergekit's
``slices``).

A slice is a range of decoder layers ``[start, end)`` of one model (passed through, optionally scaled), or of
several models of equal length merged with any registered merge (``method: slerp`` ...). The output's layers are
the slices' layers in order, renumbered from 0; ``num_hidden_layers`` (and per-layer config lists such as
``layer_types``) follow. As in mergekit, tensors before the layers (embeddings) come from the first slice and
tensors after them (final norm, LM head) from the last, merged by that slice's method where it has several
sources; per-layer value lists are gradients over each slice's own layers (position i/(L−1) within the slice).

Nothing is copied: a passed-through layer is the source's lazy ``Load`` under its new name, so the writer copies
its bytes; a merged slice runs its method on renumbered views of the sources.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from surgeon.ops.merge.inputs import MergeParams, cast_node
from surgeon.ops.merge.values import LayerValue, layer_value, parse_layer_value, resolve_model_key

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Graph
from surgeon.registry import register


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Input model name (or path on the CLI).")
    layers: tuple[int, int] = Field(description="Layer range [start, end), as mergekit's layer_range.")

    @model_validator(mode="after")
    def _order(self):
        if not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError(f"layers must be [start, end) with 0 <= start < end, got {list(self.layers)}")
        return self


class Slice(BaseModel):
    """One output slice: a layer range of one model, or equal-length ranges of several merged by ``method``."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(default_factory=list, description="Layer ranges of equal length.")
    model: str | None = Field(None, description="Shorthand for one source: the model ...")
    layers: tuple[int, int] | None = Field(None, description="... and its layer range [start, end).")
    method: str | None = Field(None, description=(
        "Merge applied to several sources (any registered merge: slerp, ties, ...). Default: passthrough."))
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of that merge.")
    base: str | None = Field(None, description="Base model of that merge (one of the sources).")
    scale: LayerValue | None = Field(None, description=(
        "Passthrough only: multiply the slice's tensors (a number, a gradient over its layers or {pattern: "
        "value}; e.g. {o_proj: 0, down_proj: 0, default: 1} for identity-initialised depth up-scaling)."))

    @field_validator("scale", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return parse_layer_value(v)

    @model_validator(mode="after")
    def _one_form(self):
        if self.model is not None or self.layers is not None:
            if self.sources or self.model is None or self.layers is None:
                raise ValueError("give either sources: [...] or model + layers, not both")
            self.sources = [SliceSource(model=self.model, layers=self.layers)]
            self.model = self.layers = None
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layers[1] - s.layers[0] for s in self.sources}
        if len(lengths) != 1:
            raise ValueError(f"all sources of a slice must have the same number of layers, got {sorted(lengths)}")
        if len(self.sources) > 1 and self.method in (None, "passthrough"):
            raise ValueError("a slice with several sources needs a merge method (method: slerp, ties, ...)")
        if self.scale is not None and len(self.sources) > 1:
            raise ValueError("scale applies to passthrough slices (one source)")
        return self

    @property
    def length(self) -> int:
        return self.sources[0].layers[1] - self.sources[0].layers[0]


class PassthroughParams(MergeParams):
    slices: list[Slice] = Field(default_factory=list, description=(
        "Output layers, in order: [{model: A, layers: [0, 20]}, {model: B, layers: [10, 30]}] or slices with "
        "several sources and a method. Without slices: copy the one input model (scaled by --scale)."))
    scale: LayerValue | None = Field(None, description="Without slices: multiply the model's tensors.")

    @field_validator("slices", mode="before")
    @classmethod
    def _parse_slices(cls, v: Any) -> Any:
        return parse_layer_value(v) if isinstance(v, str) else v

    @field_validator("scale", mode="before")
    @classmethod
    def _parse_scale(cls, v: Any) -> Any:
        return parse_layer_value(v)


# ---------------------------------------------------------------------------------------------------------
# layer renumbering


@dataclasses.dataclass
class LayerMap:
    """Where a model's layers are: ``prefix(i)`` names layer i; ``layer_of(name)`` inverts it."""

    head: str
    tail: str
    n_layers: int
    embed: set[str]

    def prefix(self, i: int) -> str:
        return f"{self.head}{i}{self.tail}"

    def layer_of(self, name: str) -> tuple[int, str] | None:
        if not name.startswith(self.head):
            return None
        rest = name[len(self.head):]
        digits = ""
        for ch in rest:
            if not ch.isdigit():
                break
            digits += ch
        if not digits or not rest[len(digits):].startswith(self.tail):
            return None
        return int(digits), rest[len(digits) + len(self.tail):]


def layer_map(g: Graph, what: str, ctx: Context) -> LayerMap:
    r = ctx.roles(g)
    p0 = r.prefixes[0]
    cut = p0.rfind("0")
    embed = {n for n in (r.embed, r.pos_embed) if n}
    if cut < 0:
        raise SurgeonError(f"merge passthrough: cannot find the layer index in {p0!r} of {what!r}")
    return LayerMap(p0[:cut], p0[cut + 1:], r.n_layers, embed)


def _per_layer_config(cfg: dict[str, Any], n_layers: int) -> list[str]:
    return [k for k, v in cfg.items() if isinstance(v, list) and len(v) == n_layers and n_layers > 1
            and k not in ("architectures",)]


def layer_view(g: Graph, lm: LayerMap, start: int, end: int, *, with_outside: bool) -> Graph:
    """``g`` restricted to layers [start, end) renumbered from 0 (config follows), plus, if asked, the tensors
    outside the layers."""
    view = g.copy()
    nodes = {}
    for name, node in g.items():
        hit = lm.layer_of(name)
        if hit is None:
            if with_outside:
                nodes[name] = node
            continue
        i, rest = hit
        if start <= i < end:
            nodes[lm.prefix(i - start) + rest] = node
    view.reorder(list(nodes), nodes)
    cfg = view.config
    for k in _per_layer_config(g.config, lm.n_layers):
        cfg[k] = list(g.config[k][start:end])
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if k in cfg:
            cfg[k] = end - start
    return view


# ---------------------------------------------------------------------------------------------------------
# op


def _scaled(node, s: float, dtype):
    return Apply(lambda x, s=s: x.float() * s, [node], label="passthrough-scale", dtype=dtype)


def _resolve_slices(params: PassthroughParams, graphs: dict[str, Graph], ctx: Context, *,
                    op: str) -> tuple[list[Slice], dict[str, LayerMap]]:
    """The slices (one whole model when none are given) with model keys resolved, and each source's layer map."""
    slices = params.slices
    if not slices:
        if len(graphs) != 1 and not params.models:
            raise SurgeonError(f"{op}: without slices it takes one model, got {len(graphs)}")
        name = params.models[0] if params.models else next(iter(graphs))
        n = layer_map(graphs[name], name, ctx).n_layers
        slices = [Slice(model=name, layers=(0, n), scale=params.scale)]
    for s in slices:
        for src in s.sources:
            src.model = resolve_model_key(src.model, list(graphs), what=f"{op}: slice source")
        if s.base is not None:
            s.base = resolve_model_key(s.base, list(graphs), what=f"{op}: slice base")
    maps = {name: layer_map(graphs[name], name, ctx) for name in {src.model for s in slices for src in s.sources}}
    for s in slices:
        for src in s.sources:
            n = maps[src.model].n_layers
            if src.layers[1] > n:
                raise SurgeonError(f"{op}: slice layers {list(src.layers)} of {src.model!r} exceed its {n} layers")
    return slices, maps


def _stacked(slices: list[Slice], results: list[Graph], out_map: LayerMap) -> dict[str, Any]:
    """The output's tensors in model order: tensors before the layers from the first slice, the slices' layers
    renumbered one after the other, tensors after them from the last slice."""
    nodes: dict[str, Any] = {}
    first, last = results[0], results[-1]
    for n, node in first.items():
        if out_map.layer_of(n) is None and n in out_map.embed:
            nodes[n] = node
    offset = 0
    for s, res in zip(slices, results):
        for name, node in res.items():
            hit = out_map.layer_of(name)
            if hit is not None:
                nodes[out_map.prefix(offset + hit[0]) + hit[1]] = node
        offset += s.length
    for n, node in last.items():
        if out_map.layer_of(n) is None and n not in out_map.embed:
            nodes[n] = node
    return nodes


def _renumber_config(cfg: dict[str, Any], slices: list[Slice], graphs: dict[str, Graph], maps: dict[str, LayerMap],
                     first_model: str, total: int, *, op: str) -> None:
    """Per-layer config lists cut and joined like the layers; the layer count set to ``total``."""
    src_cfgs = [(graphs[s.sources[0].model].config, maps[s.sources[0].model], s.sources[0].layers) for s in slices]
    for key in _per_layer_config(graphs[first_model].config, maps[first_model].n_layers):
        merged: list[Any] = []
        for c, m, (a, b) in src_cfgs:
            if not isinstance(c.get(key), list) or len(c[key]) != m.n_layers:
                raise SurgeonError(f"{op}: config key {key!r} is per layer in {first_model!r} but not in every "
                                   "source; cannot renumber it")
            merged += list(c[key][a:b])
        cfg[key] = merged
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in cfg:
            cfg[key] = total


@register("merge.passthrough", PassthroughParams, multi_model=True, torch_free=True,
          summary="Frankenmerge / depth up-scaling from layer slices.")
def merge_passthrough(graph: Graph, params: PassthroughParams, ctx: Context) -> Graph:
    """Build a model from layer slices of the inputs (frankenmerge / depth up-scaling), layers renumbered."""
    op = "merge passthrough"
    graphs = dict(ctx.graphs) or {"model": graph}
    slices, maps = _resolve_slices(params, graphs, ctx, op=op)
    first_model = slices[0].sources[0].model
    out = graphs[first_model].copy()
    results = [_slice_graph(s, graphs, maps, ctx, with_outside=k in (0, len(slices) - 1), params=params)
               for k, s in enumerate(slices)]
    nodes = _stacked(slices, results, maps[first_model])
    out.reorder(list(nodes), nodes)
    total = sum(s.length for s in slices)
    _renumber_config(out.config, slices, graphs, maps, first_model, total, op=op)
    if params.dtype is not None:
        for n, node in out.items():
            if (cast := cast_node(params, node)) is not node:
                out.replace(n, cast)
    out.tags = sorted(set(out.tags) | {"merge", "frankenmerge"})
    ctx.report(method="passthrough", layers=total,
               slices=[{"sources": [[src.model, *src.layers] for src in s.sources], "method": s.method or "passthrough"}
                       for s in slices])
    return out


def _slice_graph(s: Slice, graphs: dict[str, Graph], maps: dict[str, LayerMap], ctx: Context, *,
                 with_outside: bool, params: PassthroughParams) -> Graph:
    """The slice's layers numbered 0..L−1 (plus outside tensors when asked), passed through or merged."""
    views = {}
    for src in s.sources:
        views[src.model] = layer_view(graphs[src.model], maps[src.model], src.layers[0], src.layers[1],
                                      with_outside=with_outside)
    if len(s.sources) == 1 and s.method in (None, "passthrough"):
        view = views[s.sources[0].model]
        if s.scale is not None:
            for n, node in view.items():
                if node.dtype.is_floating_point:
                    v = layer_value(s.scale, n, s.length)
                    if v != 1.0:
                        view.replace(n, _scaled(node, v, node.dtype))
        return view
    from surgeon.registry import get_op

    method = s.method or "passthrough"
    spec = get_op(method if method.startswith("merge.") else f"merge.{method}")
    base = s.base
    if base is not None and base not in views:
        raise SurgeonError(f"merge passthrough: slice base {base!r} is not one of the slice's sources")
    names = [src.model for src in s.sources if src.model != base]
    p = spec.params(**{"models": names, "base": base, **s.params})
    sub = dataclasses.replace(ctx, graphs=views, base_name=base)
    primary = views[base] if base is not None else views[names[0]]
    return spec.apply(primary, p, sub)
