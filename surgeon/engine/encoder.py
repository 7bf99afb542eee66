"""Encoder-only stacks on the engine: a transformers encoder (the CLIP text encoder of a diffusion pipeline) run
block by block, as :class:`surgeon.engine.Engine` runs a decoder.

1. The module is built on the ``meta`` device (the caller passes it); the tensors outside the blocks (token and
   position embeddings, final norm) are read from the graph once.
2. Every sample runs up to block 0, where a pre-hook captures the hidden states and everything else the stack
   hands its layers (CLIP: the causal mask, passed positionally), in micro-batches.
3. Each block in turn is read from the graph (lazy, so earlier steps' changes are seen), cast to the compute
   dtype on the device, run over every micro-batch, and put back on ``meta``; its outputs feed the next block.
   Hidden states beyond the budget spill to disk (:class:`surgeon.engine.HiddenStore`).

Memory: one block + the non-block tensors + the samples' hidden states, whatever the depth. Where the blocks
and the final norm live in a family's module is :mod:`surgeon.arch` knowledge (the caller passes the paths).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.engine.core import _assign
from surgeon.engine.store import HiddenStore
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.graph import Graph

DEFAULT_HIDDEN_BUDGET = 1 << 30  # bytes of hidden states kept in RAM before spilling


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class StackPaths:
    """Submodule paths of an encoder stack: its blocks in order and the norm after the last one (or None)."""

    layers: tuple[str, ...]
    final_norm: str | None


@dataclass
class _Batch:
    args: tuple  # what the stack passes its layers besides the hidden states (positional)
    kwargs: dict[str, Any]


class EncoderStack:
    """Runs the encoder ``module`` (built on ``meta``) whose tensors are graph tensors ``names`` (module
    parameter name -> graph name) block by block. :meth:`outputs` is the one entry point."""

    def __init__(self, graph: Graph, module: nn.Module, names: dict[str, str], paths: StackPaths, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, micro_batch: int = 16,
                 hidden_budget: int = DEFAULT_HIDDEN_BUDGET, check_finite: bool = True):
        self.graph, self.module, self.names, self.paths = graph, module.eval(), names, paths
        self.device, self.dtype = torch.device(device), dtype
        self.micro_batch, self.hidden_budget, self.check_finite = max(1, micro_batch), hidden_budget, check_finite
        self.config = getattr(module, "config", None)
        params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        missing = sorted(params - set(names))
        if missing:
            raise SurgeonError(f"encoder stack: tensor for {missing[0]} is missing ({len(missing)} missing)")
        self._params = params
        self._globals = [p for p in names if not any(p.startswith(lp + ".") for lp in paths.layers)]
        self._globals_loaded = False

    @property
    def n_layers(self) -> int:
        return len(self.paths.layers)

    # -------------------------------------------------------------------------------------------- loading
    def _load(self, pnames: list[str]) -> None:
        from surgeon.checkpoint import check_finite as refuse_nonfinite

        with torch.no_grad():
            for pname, (gname, value) in zip(pnames, self.graph.values([self.names[p] for p in pnames])):
                if self.check_finite:
                    refuse_nonfinite(gname, value)
                is_param = pname in self._params
                cast = self.dtype if is_param and value.is_floating_point() else None
                _assign(self.module, pname, value.to(device=self.device, dtype=cast), is_param=is_param)
                del value

    def _unload(self, pnames: list[str]) -> None:
        for pname in pnames:
            if pname in self._params:
                p = self.module.get_parameter(pname)
                _assign(self.module, pname, torch.empty(p.shape, dtype=p.dtype, device="meta"), is_param=True)

    def _block_names(self, i: int) -> list[str]:
        path = self.paths.layers[i] + "."
        return [p for p in self.names if p.startswith(path)]

    def _load_globals(self) -> None:
        if self._globals_loaded:
            return
        self._load(self._globals)
        for bname, buf in list(self.module.named_buffers()):
            if buf.device.type == "meta":
                raise SurgeonError(f"encoder stack: buffer {bname} has no value (not in the checkpoint)")
            if buf.device != self.device:
                _assign(self.module, bname, buf.to(self.device), is_param=False)
        self._globals_loaded = True

    # -------------------------------------------------------------------------------------------- running
    def _embed(self, input_ids: torch.Tensor, forward_kw: dict[str, Any]) -> tuple[list[_Batch], HiddenStore]:
        """Run every micro-batch of ``input_ids [n, L]`` up to block 0."""
        self._load_globals()
        first = self.module.get_submodule(self.paths.layers[0])
        holder: dict[str, Any] = {}

        def hook(module, args, kwargs):
            holder["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            holder["batch"] = _Batch(tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Stop

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        batches, hidden = [], HiddenStore(self.hidden_budget)
        try:
            with torch.no_grad():
                for s in range(0, input_ids.shape[0], self.micro_batch):
                    try:
                        self.module(input_ids=input_ids[s:s + self.micro_batch].to(self.device), **forward_kw)
                    except _Stop:
                        pass
                    else:
                        raise SurgeonError(f"encoder stack: the model never called its first block "
                                           f"{self.paths.layers[0]!r}")
                    batches.append(holder.pop("batch"))
                    hidden.append(holder.pop("h"))
        finally:
            handle.remove()
        return batches, hidden

    def outputs(self, input_ids: torch.Tensor, *, blocks: int | None = None, final_norm: bool = True,
                **forward_kw: Any) -> Iterator[torch.Tensor]:
        """Hidden states after the first ``blocks`` blocks (all by default), then the final norm when every block
        ran and ``final_norm``; one ``[b, L, d]`` tensor per micro-batch (in order, compute dtype, on the device).
        ``blocks = n_layers - 1`` gives transformers' ``hidden_states[-2]`` (SDXL's penultimate layer)."""
        n = self.n_layers if blocks is None else blocks
        if not 0 <= n <= self.n_layers:
            raise SurgeonError(f"encoder stack: blocks {n}: expected 0..{self.n_layers}")
        batches, hidden = self._embed(input_ids, forward_kw)
        for i in range(n):
            pnames = self._block_names(i)
            self._load(pnames)
            layer = self.module.get_submodule(self.paths.layers[i])
            out = HiddenStore(self.hidden_budget)
            with torch.no_grad():
                for j, b in enumerate(batches):
                    y = layer(hidden.get(j, self.device), *b.args, **b.kwargs)
                    out.append(y[0] if isinstance(y, (tuple, list)) else y)
            hidden.clear()
            hidden = out
            self._unload(pnames)
        norm = (self.module.get_submodule(self.paths.final_norm)
                if final_norm and n == self.n_layers and self.paths.final_norm else None)
        with torch.no_grad():
            for j in range(len(batches)):
                h = hidden.get(j, self.device)
                yield norm(h) if norm is not None else h
        hidden.clear()
