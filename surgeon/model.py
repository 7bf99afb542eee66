"""Materialise a graph as a torch module, and write changed parameters back into the graph.

The module is built from the graph's config on the ``meta`` device (no memory, no random init), then every
parameter is assigned from ``graph.values(...)`` one tensor at a time, cast to the compute dtype and moved to the
device as it arrives: the weights exist once, in the module. Buffers that the constructor computes (rotary
frequencies, position ids, Gemma's embedding scale) are built for real, as ``from_pretrained`` does. Tied weights
(``lm_head`` ↔ embeddings) are tied by sharing one ``Parameter``.

``write_back`` is the way back: the parameters that differ from the graph become ``Const`` nodes of a graph copy,
in the graph's dtype; the others keep their lazy nodes (so untouched tensors are still copied byte for byte).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from surgeon.graph import Graph

KINDS = ("causal-lm", "unet", "clip-text")
_DEFAULT_COMPONENT = {"causal-lm": "", "unet": "unet", "clip-text": "text_encoder"}
#: config keys that describe how a file was stored, not the architecture
_DROP_CONFIG_KEYS = ("quantization_config", "_commit_hash")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(dtype, dtype)
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise SurgeonError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    return dt


def _component_config(graph: Graph, component: str) -> dict[str, Any]:
    cfg = graph.configs.get(component)
    if not cfg:
        have = ", ".join(repr(c) for c in graph.configs) or "none"
        what = f"component {component!r}" if component else "the model"
        raise SurgeonError(f"{what}: no config.json to build a module from (configs: {have})")
    return {k: v for k, v in cfg.items() if k not in _DROP_CONFIG_KEYS}


def _refuse_truncating_config(config: dict[str, Any], names: list[str]) -> None:
    """A config with fewer layers than the tensors would build a shorter model that silently ignores the rest."""
    from surgeon.arch import LayerCountError, roles_for

    try:
        roles_for(config, names)
    except LayerCountError:
        raise
    except SurgeonError:
        pass  # families surgeon does not know are built by transformers alone


def _build_empty(kind: str, cfg: dict[str, Any]) -> nn.Module:
    """The module with parameters on ``meta`` and buffers computed for real."""
    from accelerate import init_empty_weights

    if kind == "unet":
        try:
            from diffusers import UNet2DConditionModel
        except ImportError:
            raise SurgeonError("kind 'unet' needs diffusers (pip install 'surgeon[diffusion]')") from None
        with init_empty_weights(include_buffers=False):
            return UNet2DConditionModel.from_config(cfg)
    from transformers import AutoConfig

    mt = cfg.get("model_type")
    if not mt:
        raise SurgeonError("config.json has no model_type; cannot build a transformers module")
    try:
        config = AutoConfig.for_model(**cfg)
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad values
        raise SurgeonError(f"config.json (model_type {mt!r}): transformers cannot build it ({e})") from None
    with init_empty_weights(include_buffers=False):
        if kind == "clip-text":
            from transformers import CLIPTextModel

            return CLIPTextModel(config)
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise SurgeonError(f"model_type {mt!r}: not a causal LM transformers knows ({e})") from None


def _param_name_map(module: nn.Module, graph_names: list[str], component: str) -> dict[str, str]:
    """module parameter/buffer name -> graph tensor name (tries with/without the base model prefix)."""
    targets = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    targets |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
    base = getattr(module, "base_model_prefix", "") or ""
    comp = component + "/" if component else ""
    out: dict[str, str] = {}
    for g in graph_names:
        if comp and not g.startswith(comp):
            continue
        local = g[len(comp):]
        # CLIP text encoders are saved with or without the `text_model.` level depending on the version
        for cand in (local, f"{base}.{local}" if base else local,
                     local[len(base) + 1:] if base and local.startswith(base + ".") else local,
                     local.removeprefix("text_model."), f"text_model.{local}"):
            if cand in targets and cand not in out:
                out[cand] = g
                break
    return out


def _assign(module: nn.Module, name: str, value: torch.Tensor, *, is_param: bool) -> None:
    import torch

    mod_name, _, leaf = name.rpartition(".")
    sub = module.get_submodule(mod_name) if mod_name else module
    if is_param:
        sub._parameters[leaf] = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        sub._buffers[leaf] = value


def dense_graph(graph: Graph, component: str = "") -> Graph:
    """``graph`` itself, or a lazy dense view when its weights are stored packed (ShiftAdd)."""
    from surgeon.formats.model_types import is_shiftadd_packed

    if is_shiftadd_packed(graph.configs.get(component, {})):
        from surgeon.formats.shiftadd import dense_view

        return dense_view(graph)
    return graph


def materialize(graph: Graph, device: str = "cpu", dtype: str | torch.dtype = "float32", kind: str = "causal-lm",
                component: str | None = None, *, check_finite: bool = True) -> nn.Module:
    """Build the module of ``graph`` (or of one pipeline ``component``) in eval mode on ``device``.

    ``kind``: ``causal-lm`` (a transformers ``*ForCausalLM``), ``unet`` (diffusers ``UNet2DConditionModel``,
    component ``unet``) or ``clip-text`` (transformers ``CLIPTextModel``, component ``text_encoder``).
    Floating parameters are cast to ``dtype``; integer tensors keep theirs. The module remembers which graph
    tensor each parameter came from (``module._surgeon_names``) for :func:`write_back`. With ``check_finite``
    a tensor holding NaN/Inf is refused before any forward pass (``--allow-nonfinite`` turns it off).
    """
    import torch

    from surgeon.checkpoint import check_finite as refuse_nonfinite

    if kind not in KINDS:
        raise SurgeonError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    graph = dense_graph(graph, component or "")
    if component is None or (component == "" and kind != "causal-lm" and not graph.configs.get("")):
        component = _DEFAULT_COMPONENT[kind]
    cdtype = _torch_dtype(dtype)
    dev = torch.device(device)
    config = _component_config(graph, component)
    if kind == "causal-lm":
        _refuse_truncating_config(config, graph.names())
    module = _build_empty(kind, config)
    names = _param_name_map(module, graph.names(), component)
    params = dict(module.named_parameters(remove_duplicate=False))

    # tied pairs {target: source} that this config ties (transformers' own bookkeeping)
    tied: dict[str, str] = {}
    getter = getattr(module, "get_expanded_tied_weights_keys", None)
    if getter is not None:
        try:
            tied = dict(getter(all_submodels=True))
        except TypeError:
            tied = dict(getter())
    for target, source in tied.items():
        if target in names and source not in names:  # symmetric, as from_pretrained: keep the one stored
            names[source] = names.pop(target)
        elif target in names and source in names:
            tied = {t: s for t, s in tied.items() if t != target}  # both stored: keep both (transformers does)

    with torch.no_grad():
        for pname, (gname, value) in zip(list(names), graph.values(list(names.values()))):
            if check_finite:
                refuse_nonfinite(gname, value)
            is_param = pname in params
            # floating parameters take the compute dtype; buffers and integer tensors keep theirs
            value = value.to(device=dev, dtype=cdtype if is_param and value.is_floating_point() else None)
            _assign(module, pname, value, is_param=is_param)
            del value
        for target, source in tied.items():
            if target not in names:
                src = module.get_parameter(source)
                mod_name, _, leaf = target.rpartition(".")
                setattr(module.get_submodule(mod_name) if mod_name else module, leaf, src)

    missing = [n for n, p in module.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SurgeonError(f"tensor {missing[0]!r} needed by the {kind} module is not in the model "
                           f"({', '.join(missing[:3])}{more} missing)")
    for bname, buf in list(module.named_buffers()):
        if buf.device != dev:
            _assign(module, bname, buf.to(dev), is_param=False)
    module.eval()
    module._surgeon_names = names  # type: ignore[assignment]
    module._surgeon_component = component  # type: ignore[assignment]
    return module


def write_back(graph: Graph, module: nn.Module, names: list[str] | None = None, *, rtol: float = 0.0) -> Graph:
    """A copy of ``graph`` where each parameter of ``module`` that differs from its graph tensor is a ``Const``.

    Comparison is in the graph's dtype (a bf16 model run in fp32 and left alone compares equal). ``rtol`` > 0
    ignores changes with ``max|new - old| <= rtol · max|old|``. ``names`` restricts the check to those graph
    tensors. Tied parameters are written once, under the name the graph stores.
    """
    import torch

    from surgeon.graph import Const

    mapping: dict[str, str] | None = getattr(module, "_surgeon_names", None)
    if mapping is None:
        raise SurgeonError("write_back: the module was not built by surgeon.model.materialize")
    wanted = set(names) if names is not None else None
    if wanted is not None:
        unknown = wanted - set(mapping.values())
        if unknown:
            raise SurgeonError(f"write_back: {min(unknown)!r} is not a parameter of the module")
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(dict(module.named_buffers(remove_duplicate=False)))
    out = graph.copy()
    pairs = [(p, g) for p, g in mapping.items() if wanted is None or g in wanted]
    with torch.no_grad():
        for (pname, gname), (_, old) in zip(pairs, graph.values([g for _, g in pairs])):
            cur = tensors[pname].detach()
            new = cur.to(device="cpu", dtype=old.dtype)
            if new.shape != old.shape:
                raise SurgeonError(f"write_back: {gname} changed shape {list(old.shape)} -> {list(new.shape)}")
            if rtol > 0 and old.is_floating_point():
                diff = (new.float() - old.float()).abs().max()
                changed = bool(diff > rtol * old.float().abs().max())
            else:
                changed = not torch.equal(new, old)
            if changed:
                if new.data_ptr() == cur.data_ptr():  # same storage as the live parameter: snapshot it
                    new = new.clone()
                out.nodes[gname] = Const(new, label="module")
    return out


def decode_step(model: nn.Module, input_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """One incremental forward pass: last-position logits ``[batch, vocab]`` and the updated KV cache.

    transformers renamed ``past_key_values`` to ``cache`` (5.x); both spellings are handled here, once."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **{key: cache})
    new = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return out.logits[:, -1], new


_TOKENIZER_DIRS = {"": "", "text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def load_tokenizer(graph: Graph, component: str = ""):
    """The tokenizer of the graph's source checkpoint, from its side files (``tokenizer/`` for pipelines)."""
    sub = _TOKENIZER_DIRS.get(component, component)
    if sub == "" and not graph.configs.get("") and any(k.startswith("tokenizer/") for k in graph.side_files):
        sub = "tokenizer"
    files = {rel: Path(src) for rel, src in graph.side_files.items()
             if (os.path.dirname(rel) == sub)}
    if not any(os.path.basename(r).startswith(("tokenizer", "vocab", "merges", "spiece", "special_tokens"))
               for r in files):
        where = f"{sub}/" if sub else "the model folder"
        raise SurgeonError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, vocab...) in {where}; "
                           "copy the tokenizer of the base model into the checkpoint folder")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="surgeon-tok-") as tmp:
        for rel, src in files.items():
            os.symlink(src.resolve(), Path(tmp) / os.path.basename(rel))
        cfg = graph.configs.get(component if component else "") or graph.configs.get("")
        if cfg and not (Path(tmp) / "config.json").exists():
            (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        try:
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - tokenizer classes raise many types
            raise SurgeonError(f"tokenizer files in {sub or 'the model folder'}: cannot be loaded ({e})") from None
    return tok
