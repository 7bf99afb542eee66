"""What every merge shares: the model/base/dtype params, input gathering (LoRA adapters resolved against the
base), plan-time checks (architecture, shapes, vocabulary), per-layer parameter values, and lazy node wiring.

A merge never computes at plan time: it checks headers and configs, then builds one :class:`Apply` node per
output tensor whose inputs are the ``Load`` nodes of every model, so the writer streams tensor by tensor and
peak memory is a few tensors (n inputs + one fp32 result).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

    from surgeon.context import Context
    from surgeon.graph import Graph, Node

#: a scalar, a list over layers (interpolated like mergekit's gradients when its length differs from the
#: number of layers), or ``{pattern: value}`` (``re:<regex>`` full-match, else substring; ``default`` last).
LayerValue = Union[float, list[float], dict[str, Union[float, list[float]]]]

DTYPES = Literal["float32", "float16", "bfloat16"]


def parse_layer_value(v: Any) -> Any:
    """CLI text -> LayerValue: ``0.5``, ``0.1,0.5,0.9``, ``{"mlp": 0.3, "default": 0.5}`` or ``@file.yaml``."""
    if not isinstance(v, str):
        return v
    text = v.strip()
    if text.startswith("@"):
        from pathlib import Path

        p = Path(text[1:])
        if not p.is_file():
            raise ValueError(f"file {p} not found")
        text = p.read_text()
    if text.startswith(("{", "[")) or ":" in text or "\n" in text:
        import yaml

        return yaml.safe_load(text)
    if "," in text:
        return [float(x) for x in text.split(",") if x.strip()]
    return float(text)


def parse_float_list(v: Any) -> Any:
    if isinstance(v, str):
        return [float(x) for x in v.split(",") if x.strip()]
    if isinstance(v, (int, float)):
        return [float(v)]
    return v


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


def out_dtype(params: MergeParams, node: Node) -> torch.dtype:
    import torch

    if params.dtype is None or not node.dtype.is_floating_point:
        return node.dtype
    return getattr(torch, params.dtype)


# ---------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class MergeInputs:
    """The resolved inputs of a merge: names and graphs of the models (LoRA applied), the base if any."""

    names: list[str]
    graphs: list[Graph]
    base_name: str | None
    base: Graph | None
    primary: Graph
    vocab_aligned: bool = False  # rows permuted into one output vocabulary (tokenizer_source)

    @property
    def n(self) -> int:
        return len(self.graphs)


def _adapter_folder(g: Graph):
    from pathlib import Path

    from surgeon.lora import is_adapter_folder

    for src in g.sources:
        p = Path(src.path)
        folder = p if p.is_dir() else p.parent
        if is_adapter_folder(folder) and any(".lora_" in n for n in g.names()):
            return folder
    return None


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
    if base is not None and _adapter_folder(base) is not None:
        raise SurgeonError(f"{op}: the base {base_name!r} is a LoRA adapter; pass the full base model")
    resolved = []
    for n in names:
        g = graphs[n]
        folder = _adapter_folder(g)
        if folder is not None:
            if base is None:
                raise SurgeonError(f"{op}: {n!r} is a LoRA adapter; pass the model it was trained on with --base")
            from surgeon.lora import open_adapter

            g = open_adapter(folder).apply_to(base, what=n)
        resolved.append(g)
    primary = base if base is not None else resolved[0]
    inputs = MergeInputs(names, resolved, base_name, base, primary)
    source = getattr(params, "tokenizer_source", None)
    if source is not None:
        _align_vocabularies(inputs, str(source), graphs)
    template = getattr(params, "chat_template", None)
    if template is not None:
        _set_chat_template(inputs, str(template))
    return inputs


def _align_vocabularies(inputs: MergeInputs, source: str, graphs: dict[str, Graph]) -> None:
    from surgeon.ops.merge.vocab import TOKENIZER_FILES, apply_tokenizer_source

    participants = ([(inputs.base_name, inputs.base)] if inputs.base is not None else []) + \
        list(zip(inputs.names, inputs.graphs))
    vocab_tensors = set()
    for _, g in participants:
        vocab_tensors |= embedding_names(g)
    aligned, files = apply_tokenizer_source(participants, source, graphs, inputs.base_name, vocab_tensors)
    was_base = inputs.primary is inputs.base
    if inputs.base is not None:
        inputs.base = aligned[inputs.base_name]
    inputs.graphs = [aligned[n] for n in inputs.names]
    inputs.primary = inputs.base if was_base else inputs.graphs[0]  # fresh copies: safe to change
    for rel in TOKENIZER_FILES:
        inputs.primary.side_files.pop(rel, None)
    inputs.primary.extra_files.update(files)
    inputs.vocab_aligned = True


def _set_chat_template(inputs: MergeInputs, value: str) -> None:
    from pathlib import Path

    from surgeon.ops.merge.vocab import resolve_chat_template

    template = resolve_chat_template(value, ([inputs.base] if inputs.base is not None else []) + inputs.graphs)
    if template is None:
        return
    # the primary's copy replaces it everywhere (ops may pick the primary again from base/graphs)
    prim = inputs.primary.copy()
    if inputs.primary is inputs.base:
        inputs.base = prim
    inputs.graphs = [prim if g is inputs.primary else g for g in inputs.graphs]
    inputs.primary = prim
    prim.extra_files["chat_template.jinja"] = template
    prim.side_files.pop("chat_template.jinja", None)
    cfg_bytes = prim.extra_files.get("tokenizer_config.json")
    src = prim.side_files.get("tokenizer_config.json")
    if cfg_bytes is None and src is not None:
        cfg_bytes = Path(src).read_bytes()
    if cfg_bytes is not None:
        cfg = json.loads(cfg_bytes)
        if "chat_template" in cfg:
            cfg.pop("chat_template")
            prim.side_files.pop("tokenizer_config.json", None)
            prim.extra_files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------
# plan-time checks


def embedding_names(g: Graph) -> set[str]:
    """Embedding and LM-head tensors (the vocabulary axis), from :mod:`surgeon.arch` or by name and shape."""
    out: set[str] = set()
    try:
        from surgeon.arch import roles_for

        r = roles_for(g.config, g.names())
        for attr in ("embed", "lm_head"):
            name = getattr(r, attr, None)
            if isinstance(name, str) and name in g:
                out.add(name)
    except Exception:  # arch unknown or module not there yet: fall back to names
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

        check_same_vocabulary(all_graphs, op=op)
    skip = embedding_names(inputs.primary) if params.backbone_only else set()
    plan: dict[str, str] = {}
    prim = inputs.primary
    for t in prim.names():
        node = prim[t]
        if not node.dtype.is_floating_point or t in skip:
            plan[t] = "copy"
            continue
        for name, g in all_graphs:
            if t not in g:
                raise SurgeonError(f"{op}: tensor {t!r} is missing from {name!r}"
                                   + (" (tied embeddings in one model but not the other?)" if t in
                                      embedding_names(prim) else ""))
            other = g[t]
            if tuple(other.shape) != tuple(node.shape):
                vocab = t in embedding_names(prim)
                hint = " (vocabulary sizes differ: pass --backbone-only to keep the primary's embeddings)" if vocab \
                    else ""
                raise SurgeonError(f"{op}: tensor {t!r} has shape {list(other.shape)} in {name!r} but "
                                   f"{list(node.shape)} in {ref_name!r}{hint}")
            if not other.dtype.is_floating_point:
                raise SurgeonError(f"{op}: tensor {t!r} is {other.dtype} in {name!r}, a float dtype was expected")
        plan[t] = "merge"
    for name, g in all_graphs:
        extra = [t for t in g.names() if t not in prim and t not in skip and t not in embedding_names(g)]
        if extra:
            raise SurgeonError(f"{op}: tensor {extra[0]!r} of {name!r} is not in the primary model {ref_name!r}")
        if not params.backbone_only:
            extra = [t for t in g.names() if t not in prim]
            if extra:
                raise SurgeonError(f"{op}: tensor {extra[0]!r} of {name!r} is not in the primary model "
                                   f"{ref_name!r} (tied embeddings in one model only? --backbone-only merges the rest)")
    return plan


# ---------------------------------------------------------------------------------------------------------
# per-layer values


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name) or _ANY_INDEX.search(name)
    return int(m.group(1)) if m else None


def num_layers(g: Graph) -> int:
    n = g.config.get("num_hidden_layers") or g.config.get("n_layer") or g.config.get("num_layers")
    if isinstance(n, int) and n > 0:
        return n
    idx = [i for i in (layer_index(t) for t in g.names()) if i is not None]
    return max(idx) + 1 if idx else 1


def _gradient(values: Sequence[float], pos: float) -> float:
    if len(values) == 1:
        return float(values[0])
    x = pos * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    f = x - i
    return float(values[i] * (1 - f) + values[i + 1] * f)


def layer_value(value: Any, name: str, n_layers: int, *, embeddings: set[str] | None = None) -> float:
    """Resolve a :data:`LayerValue` for one tensor.

    A list of length ``n_layers`` gives one value per layer; another length is a gradient interpolated over the
    layers (mergekit semantics). Tensors outside the layers (embeddings, final norm, LM head) take the first value:
    mergekit 0.1.5 plans them at gradient position t = 0 (``MergePlanner.plan_module``), measured on a tiny Llama
    (``weight: [0, 1]`` gives lm_head and model.norm weight 0). ``embeddings`` is accepted for compatibility and
    unused.
    A dict is searched in order: keys ``re:<regex>`` full-match the tensor name, other keys match as substrings,
    ``default``/``*`` match everything; the first hit wins; its value may itself be a list.
    """
    if isinstance(value, dict):
        chosen = None
        for key, v in value.items():
            if key in ("default", "*"):
                continue
            if key.startswith("re:"):
                if re.fullmatch(key[3:], name):
                    chosen = v
                    break
            elif key in name:
                chosen = v
                break
        if chosen is None:
            chosen = value.get("default", value.get("*"))
        if chosen is None:
            raise SurgeonError(f"tensor {name!r}: no pattern of {sorted(value)} matches and no 'default' is given")
        return layer_value(chosen, name, n_layers, embeddings=embeddings)
    if isinstance(value, (list, tuple)):
        if not value:
            raise SurgeonError("an empty list is not a valid per-layer value")
        i = layer_index(name)
        if i is None:
            return float(value[0])
        if len(value) == n_layers:
            return float(value[min(i, n_layers - 1)])
        return _gradient(value, i / max(1, n_layers - 1))
    return float(value)


# ---------------------------------------------------------------------------------------------------------
# wiring


def merged_graph(inputs: MergeInputs, params: MergeParams, plan: dict[str, str],
                 make_fn: Callable[[str], Callable[..., torch.Tensor]], *, with_base: bool, label: str) -> Graph:
    """Copy of the primary with one lazy ``Apply`` per merged tensor.

    ``make_fn(name)`` returns ``fn(*values)`` receiving (base value first when ``with_base``) then the models'
    values in order, returning the fp32 result; ``Apply`` casts it to the output dtype.
    """
    from surgeon.graph import Apply

    g = inputs.primary.copy()
    for t, kind in plan.items():
        node = inputs.primary[t]
        if kind != "merge":
            if params.dtype is not None and node.dtype.is_floating_point and node.dtype != out_dtype(params, node):
                g.nodes[t] = Apply(lambda x: x, [node], label="cast", dtype=out_dtype(params, node))
            continue
        srcs = ([inputs.base[t]] if with_base and inputs.base is not None else []) + [m[t] for m in inputs.graphs]
        g.nodes[t] = Apply(make_fn(t), srcs, label=label, dtype=out_dtype(params, node))
    g.tags = sorted(set(g.tags) | {"merge"})
    return g


def per_model_field():
    return Field(default_factory=dict, description=(
        "Per-model overrides, as mergekit's per-model parameters: {model: {weight: [0, 1], density: 0.3}}; "
        "values may be per-layer lists or {pattern: value}. Keys: a model's name or folder name."))


def resolve_per_model(per_model: dict[str, dict[str, Any]], names: Sequence[str], allowed: Sequence[str], *,
                      op: str) -> dict[str, dict[str, Any]]:
    """``per_model`` with keys resolved to input names; unknown models or parameters fail naming them."""
    out = {}
    for key, values in per_model.items():
        name = resolve_model_key(key, names, what=f"{op}: per_model")
        for k in values:
            if k not in allowed:
                raise SurgeonError(f"{op}: per_model[{key!r}] has unknown key {k!r} (allowed: {', '.join(allowed)})")
        out[name] = dict(values)
    return out


def model_values(per_model: dict[str, dict[str, Any]], field: str, names: Sequence[str], tensor: str,
                 n_layers: int, shared: Any) -> list[float]:
    """One value of ``field`` per model for ``tensor``: the model's override, else ``shared`` (for ``weight``,
    ``shared`` is the list of per-model weights)."""
    out = []
    for i, n in enumerate(names):
        default = shared[i] if field == "weight" else shared
        out.append(layer_value(per_model.get(n, {}).get(field, default), tensor, n_layers))
    return out


def resolve_model_key(key: str, names: Sequence[str], *, what: str) -> str:
    """The input model a user-written ``key`` refers to: an exact name, else the one whose folder name is ``key``."""
    if key in names:
        return key
    from pathlib import PurePath

    hits = [n for n in names if PurePath(n).name == key or PurePath(n.rstrip("/")).name == key]
    if len(hits) == 1:
        return hits[0]
    raise SurgeonError(f"{what}: {key!r} is not one of the input models (have: {', '.join(names)})")


def check_weights(weights: list[float] | None, n: int, *, op: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise SurgeonError(f"{op}: --weights has {len(weights)} values for {n} models (one per model, in order)")
    return [float(w) for w in weights]
