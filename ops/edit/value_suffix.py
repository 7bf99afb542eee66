"""The value loop's steps after the first run only the changing positions of each row (issue 18).

δ is added at a row's subject-last token (``lookup``) at layer *l*; with causal attention the positions before it
never change at any block, so their keys and values at blocks *l..L−1* are constants. They are computed once,
without gradients, into a transformers KV cache per micro-batch of rows (contexts left-padded to the longest,
padding masked; suffixes right-padded, which causal attention keeps from the real positions, their outputs
unread; rows sorted by suffix length so that little is padded); every Adam step then runs positions
``[lookup, end)`` of each group through the resident blocks over a copy of that cache (the copy is dropped after
the step, so nothing accumulates), with the layer arguments the model's own code builds for new tokens after a
cached, padded context (:func:`surgeon.engine.cached.layer_arguments`: position ids, rotary embeddings, mask).
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
    """A micro-batch of rows: their layer-l input from ``lookup`` on (right-padded to the longest suffix), the
    cache of their left-padded contexts and the layer arguments for the suffix positions (holding ``cache``,
    replaced by a copy at each step)."""

    rows: list[int]
    x: torch.Tensor  # [b, longest suffix, d] layer l's input at the suffix positions
    cache: Any  # the contexts' cache (empty when every lookup is 0), copied for every step
    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None  # [b, P + suffix] 2-D attention mask (None: no context)
    pos: torch.Tensor  # [b, suffix] position ids of the suffixes


def group_rows(lookup: list[int], lengths: list[int], limit: int = GROUP_ROWS) -> list[list[int]]:
    """Row indices sorted by suffix length ``length − lookup`` (then index), in chunks of ``limit``."""
    order = sorted(range(len(lookup)), key=lambda i: (lengths[i] - lookup[i], i))
    return [order[k:k + limit] for k in range(0, len(order), limit)]


def left_padded(lookup: list[int], suffix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows whose contexts (``lookup`` tokens each) are left-padded to the longest: the padding flags
    ``[b, P]``, the contexts' position ids ``[b, P]`` (0 on padding) and the suffixes' ``[b, suffix]``."""
    width = max(lookup)
    lk = torch.tensor(lookup)[:, None]
    col = torch.arange(width)[None, :]
    pad = col < width - lk
    pos = (col - (width - lk)).clamp(min=0)
    return pad, pos, lk + torch.arange(suffix)[None, :]


def _run(blocks: list, h: torch.Tensor, args: tuple, kwargs: dict[str, Any],
         pad: torch.Tensor | None = None) -> torch.Tensor:
    """``h`` through ``blocks``; with ``pad`` the padded positions are zeroed after every block (a padded query
    attends to nothing: whatever it yields must not reach the next block's keys and values)."""
    for block in blocks:
        out = block.module(h, *args, **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
        if pad is not None:
            h = h.masked_fill(pad[..., None].to(h.device), 0.0)
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
            lks = [lookup[i] for i in rows]
            n_suffix = max(lengths[i] - lk for i, lk in zip(rows, lks))
            x = torch.nn.utils.rnn.pad_sequence([row_inputs[i][lk:] for i, lk in zip(rows, lks)], batch_first=True)
            mask, suf_pos = None, torch.arange(n_suffix).repeat(len(rows), 1)
            if max(lks) == 0:
                args, kwargs, cache = layer_arguments(eng, len(rows), n_suffix, position_ids=suf_pos)
            else:
                pad, pos, suf_pos = left_padded(lks, n_suffix)
                ctx = torch.zeros(len(rows), pad.shape[1], x.shape[-1], dtype=x.dtype, device=x.device)
                for k, (i, lk) in enumerate(zip(rows, lks)):
                    ctx[k, pad.shape[1] - lk:] = row_inputs[i][:lk]
                keep = (~pad).long()
                args, kwargs, cache = layer_arguments(eng, len(rows), pad.shape[1], attention_mask=keep,
                                                      position_ids=pos)
                _run(blocks, ctx, args, kwargs, pad)
                fill_below(cache, layer)
                mask = torch.cat([keep, torch.ones(len(rows), n_suffix, dtype=torch.long)], 1)
                args, kwargs, cache = layer_arguments(eng, len(rows), n_suffix, cache, position_ids=suf_pos,
                                                      attention_mask=mask)
            groups.append(SuffixGroup(rows, x.clone(), cache, args, kwargs, mask, suf_pos))
    return groups


def _live_view(eng, g: SuffixGroup, keep: torch.Tensor) -> tuple[list[int], torch.Tensor, tuple, dict[str, Any]]:
    """(rows, suffix inputs, layer arguments over a fresh copy of the cache) of the rows of ``g`` flagged in
    ``keep``; the model rebuilds the arguments when some rows are left out."""
    cache = copy.deepcopy(g.cache)
    if bool(keep.all()):
        return g.rows, g.x, *with_cache(g.args, g.kwargs, g.cache, cache)
    idx = keep.nonzero()[:, 0]
    cache.batch_select_indices(idx.to(g.x.device))
    args, kwargs, _ = layer_arguments(eng, len(idx), g.x.shape[1], cache, position_ids=g.pos[idx],
                                      attention_mask=None if g.mask is None else g.mask[idx])
    return [g.rows[int(i)] for i in idx], g.x[idx.to(g.x.device)], args, kwargs


def suffix_finals(eng, blocks: list, groups: list[SuffixGroup], live_rows: torch.Tensor, hook
                  ) -> dict[int, torch.Tensor]:
    """Last-block hidden states ``[longest suffix, d]`` (with grad) of the live rows (``live_rows`` [R] bool):
    positions from each row's lookup on; δ goes to suffix position 0."""
    out: dict[int, torch.Tensor] = {}
    for g in groups:
        keep = live_rows.cpu()[g.rows]
        if not bool(keep.any()):
            continue
        rows, x, args, kwargs = _live_view(eng, g, keep)
        hook.rows = torch.tensor(rows)
        hook.at = torch.zeros(len(rows), dtype=torch.long)
        h = _run(blocks, x, args, kwargs)
        for k, gi in enumerate(rows):
            out[gi] = h[k]
    return out
