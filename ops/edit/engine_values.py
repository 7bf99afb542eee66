"""Keys k, v₀ and v* of an edit (ALGORITHMS.md §4.2) on the model engine (:mod:`surgeon.engine`), block by block.

The objective is :mod:`.keys_values`' (:func:`~.keys_values.value_loss`, the Adam loop with per-request early
stopping and the clamp); only where the forward passes run differs:

1. The engine embeds every row (plain and prefixed rewrite prompts with their target tokens, one
   ``"{subject} is a"`` row per request; rows are unpadded, rows of equal length share a micro-batch) and runs
   the blocks before the edited layer *l* once, without gradients; their output (layer *l*'s input) is kept.
2. **Memory plan**: blocks *l..L−1* are loaded once and stay resident in the compute dtype for the few Adam
   steps (fp32 when they fit ``budget``, else bf16), with the head's output embedding in its stored dtype; every
   step runs them with gradients from layer *l*'s input, δ being added to the down-projection's output at each
   row's subject token. The head is applied to the gathered target and KL positions only, in vocabulary chunks
   (:meth:`surgeon.engine.Engine.logits`). Nothing of the blocks before *l* is resident during the loop.
3. The first pass (δ = 0) records each row's key (the down-projection's input), v₀ (its output) and h_L (the
   block's output) at the subject's last token, and is Adam's step 1, as in :mod:`.keys_values`.
4. The later steps run only each row's positions from the subject's last token on, over KV caches of the
   positions before it at blocks *l..L−1*, computed once (:mod:`.value_suffix`): δ never reaches them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .keys_values import ValueResult, ValueSettings, _adam, _Targets, average_keys
from .requests import Request
from .rows import Rows, build_rows
from .site import EditSite
from .value_suffix import SuffixGroup, build_groups, suffix_finals

#: bytes of fp32 blocks l..L−1 (+ head) kept resident for the value loop before the loop switches to bf16
RESIDENT_FP32_BUDGET = 6 << 30


def value_dtype(block_bytes_fp32: Sequence[int], layer: int, head_bytes_fp32: int, budget: int | None) -> str:
    """fp32 when blocks ``layer..`` and the head fit ``budget`` in fp32 (default :data:`RESIDENT_FP32_BUDGET`),
    else bf16 (half the bytes; the optimisation's few steps tolerate it)."""
    need = sum(block_bytes_fp32[layer:]) + head_bytes_fp32
    return "float32" if need <= (budget or RESIDENT_FP32_BUDGET) else "bfloat16"


class _DeltaHook:
    """On the edited down-projection: records key / v₀ (capture mode) and adds δ of each row's request at
    position ``at`` of each row of the current micro-batch (None: adds nothing)."""

    def __init__(self, delta: torch.Tensor, owner: torch.Tensor, n_rows: int):
        self.delta, self.owner, self.n_rows = delta, owner, n_rows
        self.rows: torch.Tensor | None = None  # global rows of the current micro-batch
        self.at: torch.Tensor | None = None  # δ's position in each of those rows
        self.capture = True
        self.k: torch.Tensor | None = None
        self.v0: torch.Tensor | None = None

    def _at(self, x: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(x.shape[0], device=x.device), self.at.to(x.device)]

    def _record(self, name: str, x: torch.Tensor) -> None:
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(self.n_rows, x.shape[-1]))
        getattr(self, name)[self.rows] = self._at(x).detach().float().cpu()

    def pre(self, _m, args):
        if self.capture:
            self._record("k", args[0])

    def post(self, _m, _args, out):
        if self.capture:
            self._record("v0", out)
        if self.at is None:
            return out
        ar = torch.arange(out.shape[0], device=out.device)
        add = torch.zeros_like(out).index_put((ar, self.at.to(out.device)),
                                              self.delta[self.owner[self.rows]].to(out.dtype))
        return out + add


def _budget(ctx) -> int | None:
    from surgeon.outputs import parse_size

    mm = getattr(ctx, "max_memory", None)
    return parse_size(mm, flag="--max-memory") if isinstance(mm, str) else mm


def _layer_inputs(eng, samples: list[torch.Tensor], layer: int) -> list[tuple[Any, torch.Tensor]]:
    """(micro-batch, layer ``layer``'s input hidden states) for every micro-batch; earlier blocks run unchanged."""
    got: list[tuple[Any, torch.Tensor]] = []
    for block in eng.blocks(samples, layers=[layer], record=False):
        got = [(mb, h.clone()) for mb, h in block.inputs()]
    return got


class _EngineRun:
    """What :func:`.keys_values._adam` works on: ``targets``, ``hooks.state["delta"]`` and ``logits(live)``."""

    def __init__(self, eng, blocks: list, inputs, rows: Rows, targets: _Targets, hook: _DeltaHook,
                 head: tuple[torch.Tensor, torch.Tensor | None]):
        self.eng, self.blocks, self.inputs, self.rows, self.targets = eng, blocks, inputs, rows, targets
        self.hook, self.head = hook, head
        self.hooks = self  # _adam reads run.hooks.state
        self.state = {"delta": hook.delta}
        self.h0: torch.Tensor | None = None
        self.abs_pos = torch.tensor(rows.tgt_pos)
        self.lookup = torch.tensor(rows.lookup)
        self.groups: list[SuffixGroup] | None = None  # after the capture pass: suffix-only steps

    def use_suffixes(self, layer: int) -> None:
        """Build the context caches (:mod:`.value_suffix`); later steps run only positions from ``lookup`` on."""
        row_inputs = {gi: x[k] for mb, x in self.inputs for k, gi in enumerate(mb.indices)}
        self.groups = build_groups(self.eng, self.blocks, layer, row_inputs, self.rows.lookup, self.hook)
        self.inputs = []  # the suffixes are held by the groups

    def _finals(self, live_rows: torch.Tensor) -> dict[int, torch.Tensor]:
        """Last-block hidden states [L, d] of every row in a micro-batch holding a live row (with grad); after
        :meth:`use_suffixes` those of positions ``lookup..`` only."""
        if self.groups is not None:
            return suffix_finals(self.eng, self.blocks, self.groups, live_rows, self.hook)
        out: dict[int, torch.Tensor] = {}
        for mb, x in self.inputs:
            if not bool(live_rows[mb.indices].any()):
                continue
            self.hook.rows = torch.tensor(mb.indices)
            self.hook.at = self.lookup[mb.indices]
            h = x
            for j, block in enumerate(self.blocks):
                h = block.call(h, mb)
                if j == 0 and self.hook.capture:
                    self._record_h0(mb.indices, h)
            for k, gi in enumerate(mb.indices):
                out[gi] = h[k]
        return out

    def _record_h0(self, indices: list[int], h: torch.Tensor) -> None:
        if self.h0 is None:
            self.h0 = torch.zeros(len(self.rows.ids), h.shape[-1])
        ar = torch.arange(len(indices))
        self.h0[indices] = h[ar, self.lookup[indices].to(h.device)].detach().float().cpu()

    def logits(self, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tg = self.targets
        live_cpu = live.cpu()
        row_live = live_cpu[tg.owner.cpu()]
        t = row_live[tg.row.cpu()].nonzero()[:, 0]
        finals = self._finals(row_live)
        kl = tg.kl_rows.cpu()[live_cpu]
        off = self.lookup if self.groups is not None else torch.zeros_like(self.lookup)
        picked = [finals[int(r)][int(p - off[r])] for r, p in zip(tg.row.cpu()[t], self.abs_pos[t])]
        picked += [finals[int(r)][int(self.lookup[r] - off[r])] for r in kl]
        return self.eng.logits(torch.stack(picked), self.head), t.to(live.device)


def _targets_abs(rows: Rows, device: str) -> _Targets:
    tgt_row = torch.tensor(rows.tgt_row, device=device)
    n_rewrite = len(rows.kl_rows) * rows.n_rewrite_rows_per_request
    per_prompt = torch.zeros(n_rewrite, device=device).index_add_(
        0, tgt_row, torch.ones(len(rows.tgt_row), device=device))
    return _Targets(torch.tensor(rows.owner, device=device), tgt_row, torch.tensor(rows.tgt_pos, device=device),
                    torch.tensor(rows.tgt_tok, device=device), torch.tensor(rows.kl_rows, device=device),
                    per_prompt, rows.n_rewrite_rows_per_request)


def optimise_values_engine(graph, ctx, site: EditSite, tok: Any, requests: Sequence[Request],
                           prefixes: Sequence[str], settings: ValueSettings, *, dtype: str | None = None,
                           status: Callable[[str], None] | None = None) -> ValueResult:
    """v* (with the averaged keys and v₀ of the same first pass) for ``requests`` at ``site``, on the engine
    (see the module docstring); ``dtype`` None picks it with :func:`value_dtype`."""
    from surgeon import engine

    rows = build_rows(tok, requests, prefixes)
    n, n_ctx = len(requests), rows.n_rewrite_rows_per_request
    samples = [torch.tensor(r, dtype=torch.long) for r in rows.ids]
    eng = engine.from_context(graph, ctx, dtype=dtype or "float32", micro_batch=64, group_by_length=True)
    if dtype is None:
        w, _ = eng.head_weights()
        chosen = value_dtype(eng.block_bytes, site.layer, w.numel() * 4, _budget(ctx))
        del w
        if chosen != "float32":
            ctx.log(f"value optimisation: blocks {site.layer}..{site.n_layers - 1} stay resident in {chosen}")
            eng = engine.from_context(graph, ctx, dtype=chosen, micro_batch=64, group_by_length=True)
    inputs = _layer_inputs(eng, samples, site.layer)
    blocks = [eng.load_block(i) for i in range(site.layer, eng.roles.n_layers)]
    device = str(eng.device)
    delta = torch.zeros(n, site.d_out, device=device, requires_grad=True)
    hook = _DeltaHook(delta, torch.tensor(rows.owner, device=device), len(rows.ids))
    mod, _ = blocks[0].module_of(site.name)
    handles = [mod.register_forward_pre_hook(hook.pre), mod.register_forward_hook(hook.post)]
    run = _EngineRun(eng, blocks, inputs, rows, _targets_abs(rows, device), hook, eng.head_weights())
    del inputs  # held by the run until its suffix groups replace them
    try:
        with torch.enable_grad():
            logits, t = run.logits(torch.ones(n, dtype=torch.bool, device=device))  # capture pass = step 1
            hook.capture = False
            run.use_suffixes(site.layer)
            kl_init = logits[len(t):].detach().log_softmax(-1)
            plain = torch.arange(n) * n_ctx  # the plain prompt's row of each request
            v0 = hook.v0[plain].to(device)
            ref = run.h0[plain].to(device) if settings.norm_reference == "layer" else v0
            keys = average_keys(hook.k[: n * n_ctx].reshape(n, n_ctx, -1), settings.uniform_keys)
            losses, probs, steps = _adam(run, logits, t, kl_init, ref, settings, status)
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            eng.unload_block(b)
    d = delta.detach()
    return ValueResult((v0 + d).T.cpu(), v0.T.cpu(), losses.tolist(), probs.tolist(), steps.tolist(),
                       keys.T.contiguous().cpu())
