"""Running some decoder blocks over a KV-cached context: the layer arguments the model's own code builds for new
positions after a cache (position ids, rotary embeddings, attention mask), and a cache filled by blocks
``l..L−1`` only.

Only blocks from some layer *l* on hold real keys and values; the layers below get zero entries of the same
length, so that the model (which reads the cache's length from layer 0) numbers the new positions after the
context. Those entries are never attended to: blocks below *l* are not run over the cache.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from surgeon.engine.core import cache_keyword, first_block_inputs
from surgeon.engine.generate import _find_cache
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.engine.core import Engine


def layer_arguments(eng: Engine, batch: int, length: int, cache: Any = None, *,
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                    ) -> tuple[tuple, dict[str, Any], Any]:
    """(positional args after the hidden states, keyword args, cache) the model hands its decoder layers for
    ``length`` new positions of ``batch`` rows after ``cache``'s contents (None: an empty cache the model
    creates), with an optional 2-D ``attention_mask`` (cached + new positions; 0 = padding) and ``position_ids``
    ``[batch, length]``. Computed by the model's own forward up to block 0, on zero input embeddings, without
    gradients."""
    eng._load_globals()
    cache_kw = cache_keyword(eng.skeleton)
    zeros = torch.zeros(batch, length, int(eng.config.hidden_size), device=eng.device, dtype=eng.dtype)
    extra = {k: v.to(eng.device) for k, v in (("attention_mask", attention_mask),
                                              ("position_ids", position_ids)) if v is not None}
    args, kwargs = first_block_inputs(eng.skeleton, eng.layer_paths[0], inputs_embeds=zeros, use_cache=True,
                                      **{cache_kw: cache}, **extra)
    args = tuple(args[1:])
    kwargs.pop("hidden_states", None)
    found = _find_cache(args, kwargs)
    if found is None:
        raise SurgeonError(f"engine: this {eng.roles.family} model passes its layers no KV cache")
    return args, kwargs, found


def fill_below(cache: Any, layer: int) -> None:
    """Give cache layers ``0..layer−1`` zero keys and values shaped like layer ``layer``'s (see the module
    docstring)."""
    if layer == 0:
        return
    src = cache.layers[layer]
    if not getattr(src, "is_initialized", False):
        raise SurgeonError(f"engine: cache layer {layer} holds no keys; run the blocks from {layer} on first")
    k, v = src.keys, src.values
    for i in range(layer):
        cache.update(torch.zeros_like(k), torch.zeros_like(v), i)


def with_cache(args: tuple, kwargs: dict[str, Any], old: Any, new: Any) -> tuple[tuple, dict[str, Any]]:
    """``args``/``kwargs`` with the cache object ``old`` replaced by ``new``."""
    return (tuple(new if a is old else a for a in args),
            {k: (new if v is old else v) for k, v in kwargs.items()})
