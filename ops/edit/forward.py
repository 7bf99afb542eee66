"""Forward-pass plumbing of the value loop on a transformers causal LM: hooks that stop at the edited layer,
the cached context keys/values, suffix-only passes bucketed by length, skipping the layers before the edited
one, and switching the attention implementation for the loop (chosen by :func:`surgeon.arch.attention_implementation`).

Nothing before the subject's last token depends on δ: those positions' keys and values are computed once, and
each step runs only the suffix from the δ position on.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from surgeon.errors import SurgeonError

from .rows import Split, chunks, positions_of


@contextmanager
def frozen(model: torch.nn.Module):
    """No parameter gradients while optimising δ; restores the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)



@contextmanager
def attention(model: torch.nn.Module, impl: str | None):
    """Run ``model`` with another attention implementation (``None``: keep its own), restored afterwards; falls
    back to eager where the model cannot switch to ``impl``."""
    current = getattr(model.config, "_attn_implementation", None)
    switch = impl is not None and current not in (None, impl) and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation(impl)
        except (ValueError, ImportError, AttributeError, KeyError):
            try:
                model.set_attn_implementation("eager")
            except (ValueError, ImportError, AttributeError, KeyError):
                switch = False
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


class StopForward(Exception):
    """Raised by a hook once the edited layer has been reached (nothing later is needed)."""


def capture_inputs(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
    """Input of ``module`` for a batch ([B, T, d_k]); the forward pass stops at ``module``."""
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise SurgeonError("internal: the edited module was not called during the forward pass")
    return got[0]



def layer_hidden(out: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor in transformers ≥ 4.54, a tuple before)."""
    return out if isinstance(out, torch.Tensor) else out[0]



def cache_kwarg(module: torch.nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; 4.x called it ``past_key_values``."""
    return _cache_kwarg_of(type(module))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@dataclass
class ContextCache:
    """Keys and values of the distinct contexts (rows often share one: the same prefix before the same
    template), and which one each row uses."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [U, heads, P, head_dim]
    row: torch.Tensor  # [R] index into U


def context_cache(model: torch.nn.Module, split: Split) -> ContextCache | None:
    """Per layer keys and values of every distinct context, computed once without δ; padded positions are zeroed
    so that they stay finite (they are masked in every later step)."""
    if split.context_ids.shape[1] == 0:
        return None
    base = model.base_model
    keyed = torch.cat([split.context_ids, split.context_mask], 1)
    unique, row = torch.unique(keyed, dim=0, return_inverse=True)
    P = split.context_ids.shape[1]
    ids, mask = unique[:, :P], unique[:, P:]
    pos = positions_of(mask)
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for part in chunks(ids.shape[0], P):
        idx = torch.tensor(list(part), device=ids.device)
        with torch.no_grad():
            out = base(input_ids=ids[idx], attention_mask=mask[idx], position_ids=pos[idx], use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        pad = (mask[idx] == 0)[:, None, :, None]
        layers.append([(layer.keys.masked_fill(pad, 0.0), layer.values.masked_fill(pad, 0.0))
                       for layer in cache.layers])
    merged = [(torch.cat([p[i][0] for p in layers]), torch.cat([p[i][1] for p in layers]))
              for i in range(len(layers[0]))]
    return ContextCache(merged, row)


#: padded tokens worth one more forward pass: a pass costs ≈ 0.19 s + 3.4 ms per token on SmolLM2 (2 cores),
#: the fixed part being every weight read once and 30 layers of small ops
PAD_TOKENS_PER_PASS = 56


def _buckets(lengths: torch.Tensor) -> torch.Tensor:
    """The padded length each row runs at: from the longest suffix down, a shorter length joins the current
    bucket when padding its rows costs at most :data:`PAD_TOKENS_PER_PASS` tokens, else it starts a bucket."""
    out = lengths.clone()
    top = None
    for n in sorted(set(lengths.tolist()), reverse=True):
        rows = lengths == n
        if top is not None and int(rows.sum()) * (top - n) <= PAD_TOKENS_PER_PASS:
            out[rows] = top
        else:
            top = n
    return out


def suffix_logits(model: torch.nn.Module, split: Split, kv: ContextCache | None,
                  rows: torch.Tensor, at_rows: torch.Tensor, at_pos: torch.Tensor,
                  on_rows: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Logits at (row, suffix position) pairs of the rows ``rows`` (``at_rows`` index into ``rows``), running
    only their suffixes on top of the cached context; the head is applied to the gathered positions only.

    Rows run in buckets by suffix length, each with its context cut to its longest one, so that padding costs
    little (suffixes are 2–4 tokens: one padded token would be a third of the work); see :func:`_buckets`.
    ``on_rows`` is called with each bucket's rows before its forward pass (the δ hook needs to know whose rows it
    sees)."""
    from transformers import DynamicCache

    base = model.base_model
    head = model.get_output_embeddings()
    whole = base is model or head is None
    lengths = split.suffix_mask[rows].sum(1)
    context = split.context_mask[rows].sum(1)
    P = split.context_ids.shape[1]
    bucket = _buckets(lengths)
    parts, where = [], torch.empty(len(rows), 2, dtype=torch.long, device=rows.device)
    for b, n in enumerate(sorted(set(bucket.tolist()))):
        pick = (bucket == n).nonzero()[:, 0]
        where[pick, 0], where[pick, 1] = b, torch.arange(len(pick), device=rows.device)
        r = rows[pick]
        keep = int(context[pick].max()) if P else 0
        kwargs: dict[str, Any] = {"input_ids": split.suffix_ids[r, :n], "position_ids": split.suffix_pos[r, :n]}
        if kv is None or keep == 0:
            kwargs["attention_mask"] = split.suffix_mask[r, :n]
        else:
            cache = DynamicCache()
            u = kv.row[r]
            for i, (k, v) in enumerate(kv.layers):
                cache.update(k[u, :, P - keep :], v[u, :, P - keep :], i)
            kwargs["attention_mask"] = torch.cat([split.context_mask[r, P - keep :], split.suffix_mask[r, :n]], 1)
            kwargs[cache_kwarg(base)] = cache
            kwargs["use_cache"] = True
        if on_rows is not None:
            on_rows(r)
        parts.append(model(**kwargs).logits if whole else base(**kwargs).last_hidden_state)
    width = max(x.shape[1] for x in parts)
    stacked = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])) for x in parts])
    start = torch.tensor([0] + [x.shape[0] for x in parts[:-1]], device=rows.device).cumsum(0)
    picked = stacked[start[where[at_rows, 0]] + where[at_rows, 1], at_pos]
    return (picked if whole else head(picked)).float()


def _decoder_stack(model: torch.nn.Module, module: torch.nn.Module) -> tuple[list[torch.nn.Module], int] | None:
    """(the decoder layers, index of the one holding ``module``), found as the ModuleList on its path."""
    path = next((name for name, m in model.named_modules() if m is module), None)
    if path is None:
        return None
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, torch.nn.ModuleList) and parts[i].isdigit():
            return list(parent), int(parts[i])
    return None


def layers_before(model: torch.nn.Module, module: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers that run before the one holding ``module``."""
    found = _decoder_stack(model, module)
    return found[0][: found[1]] if found else []


def decoder_layer(model: torch.nn.Module, module: torch.nn.Module) -> torch.nn.Module:
    """The decoder layer holding ``module`` (its output is the residual stream h_L)."""
    found = _decoder_stack(model, module)
    if found is None:
        raise SurgeonError("internal: cannot find the decoder layer that holds the edited module")
    return found[0][found[1]]


class SkipEarlyLayers:
    """The layers before the edited one do not see δ: their output at the suffix positions is recorded in the
    first (capture) pass, and afterwards the last of them returns it while the others pass their input through,
    so each step runs only the layers from the edited one on. Engaged only when a layer returns a plain tensor
    (transformers ≥ 4.54 decoder layers); otherwise every layer runs as before."""

    def __init__(self, early: list[torch.nn.Module], state: dict[str, Any], n_rows: int, width: int):
        self.early, self.state, self.n_rows, self.width = early, state, n_rows, width
        self.recorded: torch.Tensor | None = None
        self.usable = bool(early)
        self.handle = early[-1].register_forward_hook(self._record) if early else None
        self.engaged = False

    def _record(self, _m, _args, out) -> None:
        if self.state["mode"] != "capture":
            return
        if not isinstance(out, torch.Tensor):
            self.usable = False
            return
        if self.recorded is None:
            self.recorded = out.new_zeros(self.n_rows, self.width, out.shape[-1])
        self.recorded[self.state["owners_rows"], : out.shape[1]] = out.detach()

    def engage(self) -> None:
        if not self.usable or self.recorded is None:
            return
        recorded, state = self.recorded, self.state

        def passthrough(hidden_states=None, *args, **kwargs):
            return hidden_states if hidden_states is not None else kwargs["hidden_states"]

        def replay(hidden_states=None, *args, **kwargs):
            h = hidden_states if hidden_states is not None else kwargs["hidden_states"]
            return recorded[state["owners_rows"], : h.shape[1]]

        for layer in self.early[:-1]:
            layer.forward = passthrough
        self.early[-1].forward = replay
        self.engaged = True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        if self.engaged:
            for layer in self.early:
                del layer.forward
            self.engaged = False
