"""Op registry: ``@register("family.name", Params, summary=...)`` on an ``apply(graph, params, ctx) -> graph``.

The decorator is the one source of truth. The CLI subcommand and the YAML recipe step are both generated from
``Params`` (a pydantic model): field descriptions become ``--help`` text, defaults and validation are pydantic's.
So that ``surgeon --help`` lists every op without importing an op module (or torch), ``OP_INDEX`` (name ->
module, summary) is read from ``assets/op_options.json``, which ``python -m surgeon.docgen --op-options``
generates by importing every op module (:func:`discover`); tests/test_docs.py fails when it is stale.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from pydantic import BaseModel

#: the order of families in ``--help`` and the generated docs (within a family: by name); others go last
FAMILY_ORDER = ("cast", "drop", "rename", "eval", "merge", "edit", "erase", "prune", "retrain", "shiftadd", "tie",
                "recover")
OP_OPTIONS_FILE = Path(__file__).resolve().parent / "assets" / "op_options.json"


def _load_index() -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, str]], str | None]:
    """The stored op specs, the index drawn from them and, when the file cannot be read, why (generating it
    again needs no index)."""
    try:
        stored = json.loads(OP_OPTIONS_FILE.read_text(encoding="utf-8"))
        return stored, {name: (spec["module"], spec["summary"]) for name, spec in stored.items()}, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return {}, {}, (f"{OP_OPTIONS_FILE}: unreadable op index ({e.__class__.__name__}: {e}); "
                    "regenerate it with python -m surgeon.docgen --op-options")


#: STORED_SPECS: op name -> its stored CLI spec (read once; the CLI builds op commands from it without torch);
#: OP_INDEX: op name -> (module that registers it, one-line summary); both generated, never edited by hand
STORED_SPECS, OP_INDEX, _INDEX_ERROR = _load_index()


def _check_index() -> None:
    if _INDEX_ERROR:
        raise SurgeonError(_INDEX_ERROR)


def help_order(name: str) -> tuple[int, str]:
    family = name.partition(".")[0]
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), name)


@dataclass(frozen=True)
class OpSpec:
    name: str
    params: type[BaseModel]
    apply: Callable[..., Any]
    summary: str
    module: str
    multi_model: bool = False  # takes several checkpoints (merges)
    writes: bool = True  # False for report-only ops (eval), whose CLI has no --output
    model_level: bool = False  # needs forward passes (materialises the graph as a module)
    torch_free: bool = False  # draws nothing from torch's RNG and can build (and run) its graph without torch


_REGISTRY: dict[str, OpSpec] = {}


def register(name: str, params: type[BaseModel], *, summary: str | None = None, multi_model: bool = False,
             writes: bool = True, model_level: bool = False,
             torch_free: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``apply`` under ``name``; ``summary`` (default: the docstring's first line) is its one-line
    description in ``--help``. ``torch_free``: the op uses no torch random numbers and its graph can run
    without torch, so a run of such ops need not import it (about 2 s of CPU and 250 MiB)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        text = summary or (fn.__doc__ or "").strip().split("\n")[0]
        if name in _REGISTRY and _REGISTRY[name].module != fn.__module__:
            raise SurgeonError(f"internal: op {name!r} registered by {_REGISTRY[name].module} and {fn.__module__}")
        _REGISTRY[name] = OpSpec(name, params, fn, text, fn.__module__, multi_model, writes, model_level,
                                 torch_free)
        return fn

    return wrap


def discover() -> dict[str, OpSpec]:
    """Import every op module (each file under ``surgeon.ops`` that registers an op) and return all ops in help
    order. Used to generate the index; the CLI never calls it."""
    ops_pkg = importlib.import_module("surgeon.ops")
    for root in map(Path, ops_pkg.__path__):
        for path in sorted(root.rglob("*.py")):
            if "@register(" in path.read_text(encoding="utf-8"):
                rel = path.relative_to(root).with_suffix("")
                importlib.import_module(".".join(["surgeon.ops", *rel.parts]))
    return {n: _REGISTRY[n] for n in sorted(_REGISTRY, key=help_order)}


def get_op(name: str) -> OpSpec:
    if name not in _REGISTRY:
        _check_index()
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
    _check_index()
    out: dict[str, list[str]] = {}
    for name in OP_INDEX:
        fam, _, sub = name.partition(".")
        out.setdefault(fam if sub else "", []).append(sub or fam)
    return out
