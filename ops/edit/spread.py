"""MEMIT's insertion loop on the model engine (shared by ``edit.memit`` and ``edit.alphaedit``).

Meng et al., "Mass-Editing Memory in a Transformer" (arXiv 2210.07229, Alg. 1 / ``memit_main.py``): for the edited
layers l₁ < … < L in order, K_l = the averaged keys (:func:`.keys_values.average_keys`) with the earlier layers
already updated, R = Z − H_L (the top edited layer's output on the plain prompts, current weights),
R_l = R / (layers left, this one included), ΔW_l from the method's solve, applied before the next layer's keys.

On the engine this is one sequential pass over the blocks up to L (memory: one block plus the prompts' hidden
states, whatever the depth): at block l the keys are captured from the block's own input (earlier blocks'
updates are already in it), H_L is the block's output carried through blocks l+1..L (loaded one at a time and
put back), the solve runs and the block's weight is changed in place, so the engine recomputes its outputs
before they feed the next block. Z = H_L(before the batch) + δ, δ being v* − v₀ of the value optimisation at L.
The changed weights go to a spill store in fp32 (lazy nodes) for the next batch's forward passes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .keys_values import average_keys
from .requests import Request
from .rows import encode_subject, subject_span
from .site import EditSite

#: ``solve(i, residual [d_out, n], keys [d_k, n]) -> (up [d_out, n], down [n, d_k])`` for the i-th edited layer
Solve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SpreadResult:
    """One batch's spread: the factors per layer, the keys each layer's solve used (AlphaEdit's K_p: a layer's
    keys do not depend on its own or later layers' weights, so they equal the keys after the whole batch), H_L
    on the plain prompts before and after, and the changed weights as lazy fp32 nodes."""

    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    start: torch.Tensor | None = None  # H_L [d_model, n] before the batch
    reached: torch.Tensor | None = None  # H_L after every layer's update
    weights: dict[str, Any] = field(default_factory=dict)  # graph name -> Spilled node (fp32, stored orientation)


def prompt_rows(tok: Any, requests: Sequence[Request], prefixes: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token rows (plain prompt, then each prefixed one, per request; no target) and each row's subject token."""
    ids, lookup = [], []
    for r in requests:
        for p in ("", *prefixes):
            e = encode_subject(tok, *subject_span(r, p))
            ids.append(e.ids)
            lookup.append(e.lookup)
    return ids, lookup


def _at_subject(outs: list[tuple[Any, torch.Tensor]], lookup: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Hidden states [d, len(rows)] (fp32, CPU) at each listed row's subject token."""
    got: dict[int, torch.Tensor] = {}
    for mb, y in outs:
        for k, gi in enumerate(mb.indices):
            got[gi] = y[k, int(lookup[gi])].detach().float().cpu()
    return torch.stack([got[r] for r in rows], 1)


def _keys_and_outputs(block: Any, name: str, lookup: torch.Tensor, n_rows: int
                      ) -> tuple[torch.Tensor, list[tuple[Any, torch.Tensor]]]:
    """Every row's key (the input of the module holding ``name`` at the subject token, [R, d_k] fp32 CPU) and the
    block's outputs per micro-batch, from one pass over the block."""
    mod, _ = block.module_of(name)
    keys: list[torch.Tensor | None] = [None] * n_rows
    current: list[Any] = []

    def pre(_m, args):
        x = args[0]
        for k, gi in enumerate(current[0].indices):
            keys[gi] = x[k, int(lookup[gi])].detach().float().cpu()

    handle = mod.register_forward_pre_hook(pre)
    outs = []
    try:
        with torch.no_grad():
            for mb, x in block.inputs():
                current[:] = [mb]
                outs.append((mb, block.call(x, mb)))
    finally:
        handle.remove()
    return torch.stack(keys), outs  # type: ignore[arg-type]


def _carry(eng: Any, outs: list[tuple[Any, torch.Tensor]], first: int, last: int) -> list[tuple[Any, torch.Tensor]]:
    """``outs`` (block ``first - 1``'s outputs) run through blocks ``first..last``, each loaded and put back."""
    for j in range(first, last + 1):
        blk = eng.load_block(j)
        try:
            with torch.no_grad():
                outs = [(mb, blk.call(y, mb)) for mb, y in outs]
        finally:
            eng.unload_block(blk)
    return outs


def spread(graph: Any, ctx: Any, tok: Any, sites: Sequence[EditSite], requests: Sequence[Request],
           prefixes: Sequence[str], delta: torch.Tensor, solve: Solve, *, spill: Any,
           uniform_keys: bool = False) -> SpreadResult:
    """One batch's spread over ``sites`` (ascending layers) on the engine; ``delta`` [d_model, n] = v* − v₀ at
    the last site, ``solve`` the method's per-layer closed form, ``spill`` a :class:`surgeon.engine.SpillStore`
    for the changed weights."""
    from surgeon import engine

    ids, lookup_list = prompt_rows(tok, requests, prefixes)
    n, n_ctx = len(requests), 1 + len(prefixes)
    plain = [r * n_ctx for r in range(n)]
    lookup = torch.tensor(lookup_list)
    layers = [s.layer for s in sites]
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=64, group_by_length=True)
    res = SpreadResult()
    zs = None
    samples = [torch.tensor(r, dtype=torch.long) for r in ids]
    for block in eng.blocks(samples, layers=layers, record=False):
        i = layers.index(block.index)
        site = sites[i]
        rows, outs = _keys_and_outputs(block, site.name, lookup, len(ids))
        keys = average_keys(rows.reshape(n, n_ctx, -1), uniform_keys).T.contiguous()  # [d_k, n]
        current = _at_subject(_carry(eng, outs, block.index + 1, layers[-1]), lookup, plain)
        del outs
        if zs is None:
            res.start, zs = current, current + delta.float()
        up, down = solve(i, (zs - current) / (len(sites) - i), keys)
        d = (up.double() @ down.double()).float()
        w = block.param(site.name)
        with torch.no_grad():
            w.add_((d.T if site.transposed else d).to(device=w.device, dtype=w.dtype))
        res.parts.append((up, down))
        res.keys.append(keys)
        res.weights[site.name] = spill.put(site.name, w.detach().float(), label="edit")
        if i == len(sites) - 1:
            with torch.no_grad():
                res.reached = _at_subject([(mb, block.call(x, mb)) for mb, x in block.inputs()], lookup, plain)
    return res
