"""The value loop's steps after the first run only the changing positions of each row (issue 18).

δ is added at a row's subject-last token (``lookup``) at layer *l*; with causal attention the positions before it
never change at any block, so their keys and values at blocks *l..L−1* are constants. They are computed once,
without gradients, into a transformers KV cache per group of rows with equal (lookup, length); every Adam step
then runs positions ``[lookup, end)`` of each group through the resident blocks over a copy of that cache (the
copy is dropped after the step, so nothing accumulates), with the layer arguments the model's own code builds
for new tokens after a cached context (:func:`surgeon.engine.cached.layer_arguments`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from surgeon.engine.cached import fill_below, layer_arguments, with_cache

#: rows of one suffix micro-batch at most
GROUP_ROWS = 64


@dataclass
class SuffixGroup:
    """Rows of equal (lookup, length): their layer-l input from ``lookup`` on, the context cache and the layer
    arguments for the suffix positions (holding ``cache``, replaced by a copy at each step)."""

    rows: list[int]
    lookup: int
    x: torch.Tensor  # [b, length − lookup, d] layer l's input at the suffix positions
    cache: Any  # the context's cache (empty when lookup is 0), copied for every step
    args: tuple
    kwargs: dict[str, Any]


def group_rows(lookup: list[int], lengths: list[int], limit: int = GROUP_ROWS) -> list[list[int]]:
    """Row indices grouped by equal (lookup, length), in order, at most ``limit`` per group."""
    by_key: dict[tuple[int, int], list[list[int]]] = {}
    for i, key in enumerate(zip(lookup, lengths)):
        chunks = by_key.setdefault(key, [[]])
        if len(chunks[-1]) == limit:
            chunks.append([])
        chunks[-1].append(i)
    return [c for key in sorted(by_key) for c in by_key[key]]


def _run(blocks: list, h: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    for block in blocks:
        out = block.module(h, *args, **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
    return h


def build_groups(eng, blocks: list, layer: int, row_inputs: dict[int, torch.Tensor], lookup: list[int],
                 hook) -> list[SuffixGroup]:
    """Context caches of blocks ``layer..`` (``blocks``) for every group (``hook`` is switched off meanwhile:
    δ is not added in the context) and the suffix positions' layer arguments."""
    lengths = [row_inputs[i].shape[0] for i in range(len(lookup))]
    groups = []
    hook.at = None
    with torch.no_grad():
        for rows in group_rows(lookup, lengths):
            lk, x = lookup[rows[0]], torch.stack([row_inputs[i] for i in rows])
            cache = None
            if lk:
                args, kwargs, cache = layer_arguments(eng, len(rows), lk)
                _run(blocks, x[:, :lk], args, kwargs)
                fill_below(cache, layer)
            args, kwargs, got = layer_arguments(eng, len(rows), x.shape[1] - lk, cache)
            groups.append(SuffixGroup(rows, lk, x[:, lk:].clone(), got, args, kwargs))
            del cache
    return groups


def suffix_finals(blocks: list, groups: list[SuffixGroup], live_rows: torch.Tensor, hook
                  ) -> dict[int, torch.Tensor]:
    """Last-block hidden states ``[length − lookup, d]`` (with grad) of every row in a group holding a live row;
    δ goes to each row's suffix position 0."""
    out: dict[int, torch.Tensor] = {}
    for g in groups:
        if not bool(live_rows[g.rows].any()):
            continue
        hook.rows = torch.tensor(g.rows)
        hook.at = torch.zeros(len(g.rows), dtype=torch.long)
        args, kwargs = with_cache(g.args, g.kwargs, g.cache, copy.deepcopy(g.cache))
        h = _run(blocks, g.x, args, kwargs)
        for k, gi in enumerate(g.rows):
            out[gi] = h[k]
    return out
