"""Block-by-block execution of a materialised transformers decoder, for PERP's reconstruction mode until it moves
to the model engine (:mod:`surgeon.engine`, which Wanda and eval use).

The inputs of block 0 (hidden states and whatever keyword arguments the model passes its layers: rotary
position embeddings, masks, cache positions) are captured with a forward pre-hook that stops the forward pass
there; afterwards each block is called on its own with those keyword arguments, so only one block's activations
are alive at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from surgeon.errors import SurgeonError

T = TypeVar("T")


class _Stop(Exception):
    pass


@dataclass
class BlockBatch:
    """The input of the current block for one batch of windows, with the keyword arguments layers get."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def layer_modules(model: nn.Module, prefixes: list[str]) -> list[nn.Module]:
    """The decoder layers, from the architecture's layer prefixes (``model.layers.3.`` -> that submodule)."""
    out = []
    for p in prefixes:
        name = p.rstrip(".")
        mods = [name] + [name[len(b):] for b in ("model.", "transformer.") if name.startswith(b)]
        base = getattr(model, "base_model_prefix", "")
        if base:
            mods.append(f"{base}.{name}")
        for cand in mods:
            try:
                out.append(model.get_submodule(cand))
                break
            except AttributeError:
                continue
        else:
            raise SurgeonError(f"layer {name!r}: no such submodule in the {type(model).__name__} module")
    return out


def capture_block_inputs(model: nn.Module, first: nn.Module, tokens: torch.Tensor,
                         batch_size: int) -> list[BlockBatch]:
    """Run the model up to ``first`` for each batch of ``tokens`` and keep what ``first`` receives."""
    dev = next(model.parameters()).device
    batches: list[BlockBatch] = []
    holder: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        holder["batch"] = BlockBatch(hidden.detach(), kw)
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                ids = tokens[start:start + batch_size].to(dev)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
                else:  # pragma: no cover - a model that never calls its first layer
                    raise SurgeonError("internal: the first decoder layer was never called")
                batches.append(holder.pop("batch"))
    finally:
        handle.remove()
    return batches


def run_block(layer: nn.Module, batch: BlockBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output hidden states for ``hidden`` (default: the batch's own input)."""
    out = layer(batch.hidden if hidden is None else hidden, **batch.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def advance(layer: nn.Module, batches: list[BlockBatch]) -> None:
    """Replace every batch's input by the block's output (the next block's input), without grad."""
    with torch.no_grad():
        for b in batches:
            b.hidden = run_block(layer, b).detach()


def iter_batches(batches: list[T], steps: int, seed: int) -> Iterator[T]:
    """``steps`` batches cycling through a fixed shuffled order."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        yield batches[order.pop()]


def module_of(model: nn.Module, graph_name: str) -> tuple[nn.Module, str, str]:
    """(module, parameter leaf, module path) of the parameter that a graph tensor name became."""
    names: dict[str, str] = getattr(model, "_surgeon_names", {}) or {}
    param = next((p for p, g in names.items() if g == graph_name), None)
    if param is None:
        raise SurgeonError(f"{graph_name!r}: not a parameter of the materialised module")
    path, _, leaf = param.rpartition(".")
    return model.get_submodule(path), leaf, path
