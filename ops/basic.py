"""Small tensor-wise ops that exercise the contract: ``cast``, ``drop``, ``rename``.

They never import torch: their graphs (source tensors, :class:`~surgeon.graph.Cast` nodes) are written from raw
bytes (host casts streamed piece by piece, copies from a map of the source), so a cast or copy of a checkpoint
runs at disk speed in a process that starts in a fraction of a second."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import FLOAT_DTYPES, Cast, Graph
from surgeon.registry import register

FloatDtype = Literal["float32", "bfloat16", "float16", "float64"]


def _compile(pattern: str, field: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{field}: invalid regular expression {pattern!r} ({e})") from None


class CastParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: FloatDtype = Field(description="Target dtype for floating-point tensors.")
    keep: list[str] = Field(default_factory=list, description="Regexes (re.search) of tensors left as they are, "
                            "e.g. 'norm' keeps every norm weight in its current dtype.")
    keep_dtype: dict[str, FloatDtype] = Field(default_factory=dict,
                                              description="Regex -> dtype exceptions, e.g. {'norm': float32}.")

    @field_validator("keep")
    @classmethod
    def _valid_keep(cls, v: list[str]) -> list[str]:
        for p in v:
            _compile(p, "keep")
        return v

    @field_validator("keep_dtype")
    @classmethod
    def _valid_keep_dtype(cls, v: dict[str, str]) -> dict[str, str]:
        for p in v:
            _compile(p, "keep_dtype")
        return v


def cast_target(name: str, current: str, params: CastParams) -> str | None:
    """The dtype (name) tensor ``name`` of dtype ``current`` should have after the cast (None: leave it)."""
    if current not in FLOAT_DTYPES:
        return None
    if any(re.search(p, name) for p in params.keep):
        return None
    for p, dt in params.keep_dtype.items():
        if re.search(p, name):
            return dt
    return params.dtype


@register("cast", CastParams, torch_free=True,
          summary="Change tensor dtypes, with per-pattern exceptions (e.g. keep norms in fp32).")
def cast(graph: Graph, params: CastParams, ctx: Context) -> Graph:
    """Cast floating-point tensors to ``dtype`` (integer and bool tensors are never touched)."""
    graph = graph.copy()
    changed = 0
    for name in graph.names():
        node = graph[name]
        target = cast_target(name, node.dtype_name, params)
        if target is None or target == node.dtype_name:
            continue
        graph.replace(name, Cast(node, target, label=f"cast:{params.dtype}"))
        changed += 1
    graph.config["dtype"] = params.dtype
    graph.config.pop("torch_dtype", None)
    ctx.report(tensors_cast=changed)
    return graph


class DropParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(description="Regex (re.search) of tensor names to remove.")
    allow_empty: bool = Field(False, description="Do not fail when the pattern matches nothing.")

    @field_validator("pattern")
    @classmethod
    def _valid(cls, v: str) -> str:
        _compile(v, "pattern")
        return v


@register("drop", DropParams, torch_free=True, summary="Remove tensors whose names match a regular expression.")
def drop(graph: Graph, params: DropParams, ctx: Context) -> Graph:
    """Remove tensors whose names match ``pattern``."""
    graph = graph.copy()
    gone = [n for n in graph.names() if re.search(params.pattern, n)]
    if not gone and not params.allow_empty:
        raise SurgeonError(f"drop: pattern {params.pattern!r} matches no tensor")
    if len(gone) == len(graph):
        raise SurgeonError(f"drop: pattern {params.pattern!r} would remove every tensor")
    graph.remove(*gone)
    ctx.report(dropped=gone)
    return graph


class RenameParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(description="Regex (re.sub) applied to every tensor name.")
    replacement: str = Field(description="Replacement text; \\1 etc. refer to groups.")

    @field_validator("pattern")
    @classmethod
    def _valid(cls, v: str) -> str:
        _compile(v, "pattern")
        return v


@register("rename", RenameParams, torch_free=True, summary="Rename tensors with a regular expression substitution.")
def rename(graph: Graph, params: RenameParams, ctx: Context) -> Graph:
    """Rename tensors by regex substitution; two tensors mapping to one name is an error."""
    graph = graph.copy()
    rx = re.compile(params.pattern)
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    for name in graph.names():
        try:
            target = rx.sub(params.replacement, name)
        except re.error as e:
            raise SurgeonError(f"rename: replacement {params.replacement!r} is invalid ({e})") from None
        if target in taken:
            raise SurgeonError(f"rename: {name!r} and another tensor would both become {target!r}")
        taken.add(target)
        if target != name:
            mapping[name] = target
    renamed = len(mapping)
    if renamed == 0:
        raise SurgeonError(f"rename: pattern {params.pattern!r} matches no tensor name")
    graph.rename(mapping)
    ctx.report(renamed=renamed)
    return graph
