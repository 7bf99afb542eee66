"""A ``tie`` output as a trainable module, and the trained tensors back in the form it came in.

``surgeon tie`` writes three forms (docs/tie.md): compact (``config["recursion"]``, shared tensors under
``shared_prefix``, per-layer ``<module>.lora_A.weight`` / ``.lora_B.weight``), tied-base (the unrolled layers are
copies of their slot, the factors live in the ``lora/`` PEFT adapter, ``recursion.json`` says how layers map to
slots) and materialised (W_ℓ = W′ + s·B_ℓA_ℓ). :func:`read_recursion` turns any of them into one compact view
(the factored structure); a materialised input keeps it only within the run that tied it (its lazy
``LowRank`` nodes), a materialised *file* has lost it. :func:`build_module` makes the transformers module in
which every tied weight is one ``nn.Parameter`` and each relaxed linear adds ``s·B(Ax)``; :func:`write_form`
puts trained tensors back into a graph of the input's form.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph, LowRank, Node

LORA_DIR = "lora"
ADAPTER_WEIGHTS = f"{LORA_DIR}/adapter_model.safetensors"
ADAPTER_CONFIG = f"{LORA_DIR}/adapter_config.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class Recursion:
    """The factored structure of a tied model, whatever form it was stored in."""

    form: str  # compact | tied-base | materialized
    info: dict[str, Any]  # the ``recursion`` entry: layer_to_slot, layer_prefix, shared_prefix, lora_alpha_ratio
    shared: dict[str, Node]  # compact name (shared_prefix.format(k) + suffix) -> node
    own: dict[str, Node]  # per-layer tensors kept untied (norms with untie_norms), by layer name
    lora: dict[str, tuple[Node, Node]]  # module stem ("model.layers.3.self_attn.q_proj") -> (A [r, in], B [out, r])
    transposed: dict[str, bool] = field(default_factory=dict)  # stem -> delta stored transposed (Conv1D)

    @property
    def scale(self) -> float:
        return float(self.info.get("lora_alpha_ratio", 1.0))

    @property
    def slots(self) -> list[int]:
        return list(self.info["layer_to_slot"])

    def layer(self, i: int) -> str:
        return self.info["layer_prefix"].format(i=i)

    def slot(self, k: int) -> str:
        return self.info["shared_prefix"].format(k=k)


def _summary(graph: Graph, ctx: Context) -> dict[str, Any] | None:
    """``recursion.json`` of this run's tie step, or of the checkpoint on disk; None when absent."""
    if "recursion.json" in graph.extra_files:
        data = graph.extra_files["recursion.json"]
        return json.loads(data if isinstance(data, str) else data.decode())
    if "recursion.json" in graph.side_files:
        return ctx.read_json(str(graph.side_files["recursion.json"]), what="recursion.json")
    return None


def _file_bytes(graph: Graph, ctx: Context, rel: str) -> bytes | None:
    if rel in graph.extra_files:
        data = graph.extra_files[rel]
        return data if isinstance(data, bytes) else data.encode()
    if rel in graph.side_files:
        return ctx.read(str(graph.side_files[rel]), what=rel)
    for src in graph.sources:  # weight files are not side files: the adapter's tensors beside the checkpoint
        folder = Path(src.path) if Path(src.path).is_dir() else Path(src.path).parent
        if (folder / rel).is_file():
            return ctx.read(str(folder / rel), what=rel)
    return None


def read_recursion(graph: Graph, ctx: Context, op: str = "retrain.distill") -> Recursion:
    """The factored structure of ``graph`` (compact, tied-base or materialised-in-this-run); one-line errors
    for a model that was never tied or a materialised checkpoint read from disk."""
    info = graph.config.get("recursion")
    if isinstance(info, dict):
        return _read_compact(graph, info)
    summary = _summary(graph, ctx)
    if summary is None or "layer_to_slot" not in summary:
        raise SurgeonError(f"{op}: the student is not a tied model (config.json has no 'recursion' entry and "
                           f"there is no recursion.json); run `surgeon tie` on it first")
    if summary.get("form") == "tied-base":
        return _read_tied_base(graph, ctx, summary, op)
    return _read_materialized(graph, summary, op)


def _read_compact(graph: Graph, info: dict[str, Any]) -> Recursion:
    stem = info["shared_prefix"].split("{k}")[0]
    shared = {n: node for n, node in graph.items() if n.startswith(stem)}
    lora: dict[str, tuple[Node, Node]] = {}
    for n, node in graph.items():
        if n.endswith(".lora_A.weight"):
            module = n.removesuffix(".lora_A.weight")
            lora[module] = (node, graph[module + ".lora_B.weight"])
    layer_stems = tuple(info["layer_prefix"].format(i=i) for i in range(len(info["layer_to_slot"])))
    own = {n: node for n, node in graph.items()
           if n.startswith(layer_stems) and ".lora_A." not in n and ".lora_B." not in n}
    return Recursion("compact", info, shared, own, lora)


def _layer_suffixes(graph: Graph, prefix: str) -> list[str]:
    return [n[len(prefix):] for n in graph.names() if n.startswith(prefix)]


def _split_layers(graph: Graph, info: dict[str, Any]) -> tuple[dict[str, Node], dict[str, Node]]:
    """Shared nodes (each slot from its first layer) and the untied per-layer vectors of an unrolled graph."""
    slots = info["layer_to_slot"]
    first = {k: slots.index(k) for k in set(slots)}
    shared: dict[str, Node] = {}
    own: dict[str, Node] = {}
    for i, k in enumerate(slots):
        prefix = info["layer_prefix"].format(i=i)
        for suffix in _layer_suffixes(graph, prefix):
            node = graph[prefix + suffix]
            if info.get("untie_norms") and len(node.shape) == 1:
                own[prefix + suffix] = node
            elif i == first[k]:
                shared[info["shared_prefix"].format(k=k) + suffix] = node
    return shared, own


def _read_tied_base(graph: Graph, ctx: Context, summary: dict[str, Any], op: str) -> Recursion:
    from safetensors.torch import load

    shared, own = _split_layers(graph, summary)
    lora: dict[str, tuple[Node, Node]] = {}
    raw = _file_bytes(graph, ctx, ADAPTER_WEIGHTS)
    if raw is None and summary.get("ranks"):
        raise SurgeonError(f"{op}: tied-base student without its {ADAPTER_WEIGHTS} (the per-layer LoRA)")
    tensors = load(raw) if raw is not None else {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
            lora[module] = (Const(a, label="lora_A"), Const(b, label="lora_B"))
    return Recursion("tied-base", summary, shared, own, lora)


def _read_materialized(graph: Graph, summary: dict[str, Any], op: str) -> Recursion:
    scale = float(summary.get("lora_alpha_ratio", 1.0))
    lora: dict[str, tuple[Node, Node]] = {}
    transposed: dict[str, bool] = {}
    unrolled = Graph(dict(graph.items()))
    for name, node in graph.items():  # relaxed layers: the shared node under the LowRank, factors beside it
        if isinstance(node, LowRank):
            unrolled.replace(name, node.inputs[0])
            stem = name.removesuffix(".weight")
            lora[stem] = (Const(node.down, label="lora_A"), Const(node.up / scale, label="lora_B"))
            transposed[stem] = node.transposed
    if summary.get("ranks") and not lora:
        raise SurgeonError(f"{op}: a materialised tie output read from disk has lost the shared/LoRA split "
                           f"(W = W' + BA is one tensor); distill the compact output (`tie` without "
                           f"--materialize), or run tie --materialize and retrain.distill in one recipe")
    shared, own = _split_layers(unrolled, summary)
    return Recursion("materialized", summary, shared, own, lora, transposed)


# --- the module -------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + scale·B(Ax)``: the relaxed linear of one unrolled layer (Bae et al. Eq. 3); ``base`` holds
    the slot's shared weight."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(a)  # [r, in]
        self.lora_B = nn.Parameter(b)  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)


@dataclass
class RecursiveModule:
    model: nn.Module
    params: dict[str, nn.Parameter]  # compact name -> parameter (shared, own, lora factors, outside tensors)
    kinds: dict[str, str]  # compact name -> shared | lora | norm | other


def build_module(graph: Graph, rec: Recursion, ctx: Context) -> RecursiveModule:
    """The unrolled transformers module of ``rec`` in fp32, tied weights as one ``Parameter`` per slot tensor."""
    shared = {n: Const(v.float(), label="shared") for n, v in Graph(dict(rec.shared)).values(list(rec.shared))}
    view = graph.copy()
    keep = [n for n in graph.names() if n not in rec.shared and n not in rec.own
            and not n.endswith((".lora_A.weight", ".lora_B.weight")) and not _in_layers(n, rec)]
    new: dict[str, Node] = {}
    order = list(keep)
    for i, k in enumerate(rec.slots):
        for s_name, node in shared.items():
            if s_name.startswith(rec.slot(k)):
                name = rec.layer(i) + s_name[len(rec.slot(k)):]
                new[name] = node
                order.append(name)
        for o_name, node in rec.own.items():
            if o_name.startswith(rec.layer(i)):
                new[o_name] = node
                order.append(o_name)
    view.reorder(order, new=new)
    view.configs[""] = {k: v for k, v in graph.config.items() if k != "recursion"}
    model = ctx.module(view, dtype="float32")
    module_of = {g: m for m, g in model._surgeon_names.items()}
    params: dict[str, nn.Parameter] = {}
    kinds: dict[str, str] = {}
    norm_params = {id(p) for mod in model.modules() if "norm" in type(mod).__name__.lower()
                   for p in mod.parameters(recurse=False)}
    for i, k in enumerate(rec.slots):
        for s_name in shared:
            if not s_name.startswith(rec.slot(k)):
                continue
            target = module_of[rec.layer(i) + s_name[len(rec.slot(k)):]]
            if s_name not in params:
                params[s_name] = model.get_parameter(target)
                kinds[s_name] = "norm" if id(params[s_name]) in norm_params else "shared"
            _set_param(model, target, params[s_name])
    for name in keep:
        if name in module_of and isinstance(_get(model, module_of[name]), nn.Parameter):
            params[name] = model.get_parameter(module_of[name])
            kinds[name] = "norm" if id(params[name]) in norm_params else "other"
    for name in rec.own:
        params[name] = model.get_parameter(module_of[name])
        kinds[name] = "norm" if id(params[name]) in norm_params else "other"
    factors = dict(zip(rec.lora, _lora_values(rec)))
    for stem, (a, b) in factors.items():
        target = module_of[stem + ".weight"].removesuffix(".weight")
        owner, _, attr = target.rpartition(".")
        parent = model.get_submodule(owner)
        wrapped = LoRALinear(getattr(parent, attr), a.float().to(ctx.device), b.float().to(ctx.device), rec.scale)
        setattr(parent, attr, wrapped)
        params[stem + ".lora_A.weight"], params[stem + ".lora_B.weight"] = wrapped.lora_A, wrapped.lora_B
        kinds[stem + ".lora_A.weight"] = kinds[stem + ".lora_B.weight"] = "lora"
    for p in model.parameters():
        p.requires_grad_(False)
    return RecursiveModule(model.eval(), params, kinds)


def _in_layers(name: str, rec: Recursion) -> bool:
    return any(name.startswith(rec.layer(i)) for i in range(len(rec.slots)))


def _lora_values(rec: Recursion) -> list[tuple[torch.Tensor, torch.Tensor]]:
    nodes = [n for pair in rec.lora.values() for n in pair]
    vals = [v for _, v in Graph({str(i): n for i, n in enumerate(nodes)}).values([str(i) for i in range(len(nodes))])]
    return [(vals[2 * j], vals[2 * j + 1]) for j in range(len(rec.lora))]


def _get(model: nn.Module, name: str) -> Any:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, param)


# --- back into a graph ----------------------------------------------------------------------------------------
def write_form(graph: Graph, rec: Recursion, trained: dict[str, torch.Tensor], ctx: Context) -> Graph:
    """A copy of ``graph`` in its own form with ``trained`` (compact name -> fp32 tensor) in place."""
    out = graph.copy()

    def node(name: str, like: Node) -> Node:
        return Const(trained[name].to(like.dtype), label="distill") if name in trained else like

    if rec.form == "compact":
        for name, value in trained.items():
            out.replace(name, Const(value.to(graph[name].dtype), label="distill"))
    else:
        outside = [n for n in trained if n in graph and not _in_layers(n, rec)]
        for name in outside:
            out.replace(name, node(name, graph[name]))
        for name in rec.own:
            out.replace(name, node(name, graph[name]))
        for i, k in enumerate(rec.slots):
            for s_name, s_node in rec.shared.items():
                if not s_name.startswith(rec.slot(k)):
                    continue
                layer_name = rec.layer(i) + s_name[len(rec.slot(k)):]
                base = node(s_name, s_node)
                stem = layer_name.removesuffix(".weight")
                if rec.form == "materialized" and stem in rec.lora:
                    a = trained.get(stem + ".lora_A.weight")
                    b = trained.get(stem + ".lora_B.weight")
                    a0, b0 = _lora_values(Recursion(rec.form, rec.info, {}, {}, {stem: rec.lora[stem]}))[0]
                    a, b = (a0 if a is None else a), (b0 if b is None else b)
                    base = LowRank(base, b.float() * rec.scale, a.float(), transposed=rec.transposed.get(stem, False),
                                   label="distill.relaxed")
                out.replace(layer_name, base)
    if rec.form != "materialized" and (_file_bytes(graph, ctx, ADAPTER_WEIGHTS) is not None or rec.form == "tied-base"):
        _rewrite_adapter(out, rec, trained)
    return out


def _rewrite_adapter(out: Graph, rec: Recursion, trained: dict[str, torch.Tensor]) -> None:
    """The ``lora/`` adapter with the trained factors (its config, ranks and alphas unchanged)."""
    from safetensors.torch import save

    dtype = next((n.dtype for n in rec.shared.values() if len(n.shape) == 2), torch.float32)
    tensors = {}
    for stem, (a, b) in zip(rec.lora, _lora_values(rec)):
        a = trained.get(stem + ".lora_A.weight", a)
        b = trained.get(stem + ".lora_B.weight", b)
        tensors[f"{PEFT_PREFIX}{stem}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{stem}.lora_B.weight"] = b.to(dtype).contiguous()
    out.extra_files[ADAPTER_WEIGHTS] = save(tensors, metadata={"format": "pt"})
