"""What every merge shares: the model/base/dtype params, input gathering (LoRA adapters resolved against the
base), plan-time checks (architecture, shapes, vocabulary) and lazy node wiring; per-layer values live in
:mod:`surgeon.ops.merge.values`, vocabulary alignment in :mod:`surgeon.ops.merge.vocab`.

A merge never computes at plan time: it checks headers and configs, then builds one :class:`Apply` node per
output tensor whose inputs are the ``Load`` nodes of every model, so the writer streams tensor by tensor and
peak memory is a few tensors (n inputs + one fp32 result).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgeon.errors import SurgeonError
from surgeon.lora import adapter_folder
from surgeon.tensorfile import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

    from surgeon.context import Context
    from surgeon.graph import Graph, Node
    from surgeon.tensorfile import HostArray

DTYPES = Literal["float32", "float16", "bfloat16"]


class MergeParams(BaseModel):
    """Fields common to every merge (``models``, ``base``, ``dtype``, ``backbone_only``)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list, description=(
        "Input models (paths or recipe names), in order. Default: every input model except the base."))
    base: str | None = Field(None, description="The common base model the inputs were fine-tuned from.")
    dtype: DTYPES | None = Field(None, description=(
        "Output dtype (float32, float16, bfloat16). Default: keep the primary model's dtype per tensor. "
        "Arithmetic is always fp32."))
    backbone_only: bool = Field(False, description=(
        "Merge everything except the embeddings and the LM head, which are copied from the primary model "
        "(use when vocabulary sizes differ)."))

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [x for x in v.split(",") if x]
        return v


class VocabMergeParams(MergeParams):
    """A merge that can build its output vocabulary (mergekit's ``tokenizer_source``) and set a chat template."""

    tokenizer_source: str | None = Field(None, description=(
        "Output vocabulary: base, union (all inputs' tokens) or an input model's name; every input's embedding "
        "and LM-head rows are permuted into it first (missing tokens: the only owner's row, else the base's, else "
        "the mean). Required when the inputs' vocabularies differ."))
    chat_template: str | None = Field(None, description=(
        "Chat template of the output: auto (the most common among the inputs), chatml, or a Jinja template."))


def out_dtype(params: MergeParams, node: Node) -> str:
    """The output dtype's name of a merged tensor: ``--dtype`` for float tensors, else the primary's."""
    if params.dtype is None or node.dtype_name not in FLOAT_DTYPES:
        return node.dtype_name
    return params.dtype


def cast_node(params: MergeParams, node: Node) -> Node:
    """``node`` converted to its :func:`out_dtype` (``node`` itself when that is its dtype)."""
    from surgeon.graph import Cast

    dt = out_dtype(params, node)
    return node if dt == node.dtype_name else Cast(node, dt)



@dataclass
class MergeInputs:
    """The resolved inputs of a merge: names and graphs of the models (LoRA applied), the base if any."""

    names: list[str]
    graphs: list[Graph]
    base_name: str | None
    base: Graph | None
    primary: Graph
    vocab_aligned: bool = False  # rows permuted into one output vocabulary (tokenizer_source)
    ctx: Context | None = None  # the run's context (roles, side files of the inputs)

    @property
    def n(self) -> int:
        return len(self.graphs)


def gather_inputs(graph: Graph, params: MergeParams, ctx: Context, *, need_base: bool,
                  min_models: int = 1, op: str = "merge") -> MergeInputs:
    """Resolve ``params.models``/``params.base`` to graphs; adapters become base + s·BA (lazily)."""
    graphs = dict(ctx.graphs)
    base_name = params.base or ctx.base_name
    if base_name is not None and base_name not in graphs:
        raise SurgeonError(f"{op}: base {base_name!r} is not among the input models "
                           f"(have: {', '.join(graphs) or 'none'})")
    if not graphs:
        graphs = {"model": graph}
    names = list(params.models) or [n for n in graphs if n != base_name]
    for n in names:
        if n not in graphs:
            raise SurgeonError(f"{op}: model {n!r} is not among the input models (have: {', '.join(graphs)})")
        if n == base_name:
            raise SurgeonError(f"{op}: {n!r} is given both as the base and as a model to merge")
    if len(names) < min_models:
        raise SurgeonError(f"{op}: needs at least {min_models} model(s) besides the base, got {len(names)}")
    if need_base and base_name is None:
        raise SurgeonError(f"{op}: needs a base model (--base BASE): task vectors are differences to it")
    base = graphs[base_name] if base_name is not None else None
    if base is not None and adapter_folder(base) is not None:
        raise SurgeonError(f"{op}: the base {base_name!r} is a LoRA adapter; pass the full base model")
    resolved = []
    for n in names:
        g = graphs[n]
        folder = adapter_folder(g)
        if folder is not None:
            if base is None:
                raise SurgeonError(f"{op}: {n!r} is a LoRA adapter; pass the model it was trained on with --base")
            from surgeon.lora import open_adapter

            g = open_adapter(folder).apply_to(base, what=n)
        resolved.append(g)
    primary = base if base is not None else resolved[0]
    inputs = MergeInputs(names, resolved, base_name, base, primary, ctx=ctx)
    source = getattr(params, "tokenizer_source", None)
    template = getattr(params, "chat_template", None)
    if source is not None or template is not None:
        from surgeon.ops.merge.vocab import align_vocabularies, set_chat_template

        if source is not None:
            align_vocabularies(inputs, str(source), graphs, ctx)
        if template is not None:
            set_chat_template(inputs, str(template), ctx)
    return inputs


def embedding_names(g: Graph, ctx: Context) -> set[str]:
    """Embedding and LM-head tensors (the vocabulary axis), from the architecture's roles or by name and shape."""
    out: set[str] = set()
    try:
        r = ctx.roles(g)
        for attr in ("embed", "lm_head"):
            name = getattr(r, attr, None)
            if isinstance(name, str) and name in g:
                out.add(name)
    except Exception:  # noqa: BLE001, S110 - an unknown or odd architecture falls back to names and shapes
        pass
    vocab = g.config.get("vocab_size") if isinstance(g.config, dict) else None
    for n in g.names():
        node = g[n]
        leaf = n.lower()
        if re.search(r"(embed_tokens|wte|word_embeddings|lm_head|embed_out|output_layer|shared)\.weight$", leaf) or (
                vocab and node.shape and node.shape[0] == vocab and len(node.shape) == 2
                and re.search(r"(embed|head|wte|output)", leaf)):
            out.add(n)
    return out


_ARCH_KEYS = ("model_type", "architectures")


def check_compatible(inputs: MergeInputs, params: MergeParams, *, op: str = "merge") -> dict[str, str]:
    """Check architectures, tensor sets, shapes and dtypes before computing anything.

    Returns ``{tensor: "merge" | "copy"}`` over the primary's tensors. Raises naming the tensor and the models.
    """
    ctx = inputs.ctx
    if ctx is None:
        raise SurgeonError(f"internal: {op}: MergeInputs without a context")
    all_graphs = ([(inputs.base_name or "base", inputs.base)] if inputs.base is not None else []) + \
        list(zip(inputs.names, inputs.graphs))
    ref_name, ref = all_graphs[0]
    for name, g in all_graphs[1:]:
        for key in _ARCH_KEYS:
            a, b = ref.config.get(key), g.config.get(key)
            if a is not None and b is not None and a != b:
                raise SurgeonError(f"{op}: {name!r} has {key} {json.dumps(b)}, {ref_name!r} has {json.dumps(a)}; "
                                   "merging needs one architecture")
    if not params.backbone_only and not inputs.vocab_aligned:
        from surgeon.ops.merge.vocab import check_same_vocabulary

        check_same_vocabulary(all_graphs, ctx, op=op)
    skip = embedding_names(inputs.primary, ctx) if params.backbone_only else set()
    plan: dict[str, str] = {}
    prim = inputs.primary
    for t in prim.names():
        node = prim[t]
        if node.dtype_name not in FLOAT_DTYPES or t in skip:
            plan[t] = "copy"
            continue
        for name, g in all_graphs:
            if t not in g:
                raise SurgeonError(f"{op}: tensor {t!r} is missing from {name!r}"
                                   + (" (tied embeddings in one model but not the other?)" if t in
                                      embedding_names(prim, ctx) else ""))
            other = g[t]
            if tuple(other.shape) != tuple(node.shape):
                vocab = t in embedding_names(prim, ctx)
                hint = " (vocabulary sizes differ: pass --backbone-only to keep the primary's embeddings)" if vocab \
                    else ""
                raise SurgeonError(f"{op}: tensor {t!r} has shape {list(other.shape)} in {name!r} but "
                                   f"{list(node.shape)} in {ref_name!r}{hint}")
            if other.dtype_name not in FLOAT_DTYPES:
                raise SurgeonError(f"{op}: tensor {t!r} is {other.dtype_name} in {name!r}, a float dtype was "
                                   "expected")
        plan[t] = "merge"
    for name, g in all_graphs:
        extra = [t for t in g.names() if t not in prim and t not in skip and t not in embedding_names(g, ctx)]
        if extra:
            raise SurgeonError(f"{op}: tensor {extra[0]!r} of {name!r} is not in the primary model {ref_name!r}")
        if not params.backbone_only:
            extra = [t for t in g.names() if t not in prim]
            if extra:
                raise SurgeonError(f"{op}: tensor {extra[0]!r} of {name!r} is not in the primary model "
                                   f"{ref_name!r} (tied embeddings in one model only? --backbone-only merges the rest)")
    return plan



def merged_graph(inputs: MergeInputs, params: MergeParams, plan: dict[str, str],
                 make_fn: Callable[[str], Callable[..., torch.Tensor]], *, with_base: bool, label: str,
                 make_host: Callable[[str], Callable[..., HostArray]] | None = None) -> Graph:
    """Copy of the primary with one lazy ``Apply`` per merged tensor.

    ``make_fn(name)`` returns ``fn(*values)`` receiving (base value first when ``with_base``) then the models'
    values in order, returning the fp32 result; ``Apply`` casts it to the output dtype.
    """
    from surgeon.graph import Apply

    g = inputs.primary.copy()
    for t, kind in plan.items():
        node = inputs.primary[t]
        if kind != "merge":
            if (cast := cast_node(params, node)) is not node:
                g.replace(t, cast)
            continue
        srcs = ([inputs.base[t]] if with_base and inputs.base is not None else []) + [m[t] for m in inputs.graphs]
        g.replace(t, Apply(make_fn(t), srcs, label=label, dtype=out_dtype(params, node),
                           host_fn=make_host(t) if make_host is not None else None))
    g.tags = sorted(set(g.tags) | {"merge"})
    return g


def check_weights(weights: list[float] | None, n: int, *, op: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise SurgeonError(f"{op}: --weights has {len(weights)} values for {n} models (one per model, in order)")
    return [float(w) for w in weights]
