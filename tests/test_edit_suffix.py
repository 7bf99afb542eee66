"""Issue 18: the value loop's suffix-only steps (:mod:`surgeon.ops.edit.value_suffix`: positions from the
subject's last token on, over KV caches of the context at blocks l..L−1) give the loss and the gradient of δ that
whole rows give. The oracle is a literal whole-row forward of the transformers model (eager attention, one row
at a time) with δ added at each row's lookup position of layer l's down-projection output."""
from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama

from surgeon.context import Context

LAYER = 1
# (length, lookup): suffix lengths 5, 3, 5, 5, 5, 1 and lookups 2, 4, 4, 4, 0, 5 (one row without context):
# left-padded contexts, right-padded suffixes
ROWS = [(7, 2), (7, 4), (9, 4), (9, 4), (5, 0), (6, 5)]
OWNER = [0, 0, 1, 1, 2, 2]


def _setup(tmp_path):
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    folder = save_tiny_llama(tmp_path / "m", layers=4, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (n,), generator=g) for n, _ in ROWS]
    delta = torch.randn(3, 64, generator=g) * 0.5
    proj = torch.randn(64, 17, generator=g)
    return folder, Graph.from_checkpoint(open_checkpoint(folder)), ids, delta, proj


#: the live rows of each step: all, then a subset (converged requests' rows leave the micro-batch)
LIVE = [list(range(len(ROWS))), [1, 2, 4]]


def _loss(finals: dict[int, torch.Tensor], proj: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """A nonlinear scalar of the rows' last-block states at positions lookup.. (row order fixed)."""
    return sum(torch.logsumexp(finals[i] @ proj, -1).mean() * (i + 1) for i in rows) / len(ROWS)


def _whole_rows(folder, ids, delta, proj) -> tuple[list, dict[int, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    d = delta.clone().requires_grad_(True)
    cur: dict[str, int] = {}
    finals: dict[int, torch.Tensor] = {}

    def add(_m, _a, out):
        out = out.clone()
        out[0, ROWS[cur["i"]][1]] += d[OWNER[cur["i"]]]
        return out

    def last(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        finals[cur["i"]] = h[0, ROWS[cur["i"]][1]:]

    hs = [model.model.layers[LAYER].mlp.down_proj.register_forward_hook(add),
          model.model.layers[-1].register_forward_hook(last)]
    try:
        for i, x in enumerate(ids):
            cur["i"] = i
            model(input_ids=x[None], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    want = []
    for rows in LIVE:
        loss = _loss(finals, proj, rows)
        want.append((loss.detach(), torch.autograd.grad(loss, d, retain_graph=True)[0]))
    return want, {i: f.detach() for i, f in finals.items()}


def _suffix_steps(graph, ids, delta, proj):
    from surgeon.ops.edit.engine_values import _DeltaHook, _layer_inputs
    from surgeon.ops.edit.value_suffix import build_groups, suffix_finals

    from surgeon import engine

    eng = engine.from_context(graph, Context(quiet=True), dtype="float32", micro_batch=64, group_by_length=True)
    inputs = _layer_inputs(eng, ids, LAYER)
    blocks = [eng.load_block(i) for i in range(LAYER, eng.roles.n_layers)]
    d = delta.clone().requires_grad_(True)
    hook = _DeltaHook(d, torch.tensor(OWNER), len(ROWS))
    hook.capture = False
    mod, _ = blocks[0].module_of(f"model.layers.{LAYER}.mlp.down_proj.weight")
    handle = mod.register_forward_hook(hook.post)
    row_inputs = {gi: x[k] for mb, x in inputs for k, gi in enumerate(mb.indices)}
    groups = build_groups(eng, blocks, LAYER, row_inputs, [lk for _, lk in ROWS], hook)
    got = []
    try:
        with torch.enable_grad():
            for rows in [*LIVE, LIVE[0]]:  # the same δ each time: the caches must not grow
                d.grad = None
                live = torch.zeros(len(ROWS), dtype=torch.bool)
                live[rows] = True
                finals = suffix_finals(eng, blocks, groups, live, hook)
                assert sorted(finals) == rows
                finals = {i: f[: ROWS[i][0] - ROWS[i][1]] for i, f in finals.items()}  # the padding is not read
                loss = _loss(finals, proj, rows)
                loss.backward()
                got.append((loss.detach(), d.grad.clone(), {i: f.detach() for i, f in finals.items()}))
    finally:
        handle.remove()
    return got, groups


def test_left_padded_contexts():
    from surgeon.ops.edit.value_suffix import left_padded

    pad, pos, suf = left_padded([2, 0, 3], 2)
    assert pad.tolist() == [[True, False, False], [True, True, True], [False, False, False]]
    assert pos.tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 2]]
    assert suf.tolist() == [[2, 3], [0, 1], [3, 4]]


def test_suffix_only_steps_equal_whole_rows(tmp_path):
    folder, graph, ids, delta, proj = _setup(tmp_path)
    want, want_finals = _whole_rows(folder, ids, delta, proj)
    got, groups = _suffix_steps(graph, ids, delta, proj)
    assert [g.rows for g in groups] == [[5, 1, 0, 2, 3, 4]]
    for (loss, grad, finals), (want_loss, want_grad) in zip(got, [*want, want[0]]):
        assert want_grad.abs().sum() > 0
        for i in finals:
            torch.testing.assert_close(finals[i], want_finals[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("lookup", "lengths", "limit", "want"), [
    ([2, 4, 4, 4, 0], [7, 9, 9, 8, 5], 64, [[3, 0, 1, 2, 4]]),
    ([3, 3, 3, 1], [6, 6, 6, 6], 2, [[0, 1], [2, 3]]),
])
def test_rows_sort_by_suffix_length(lookup, lengths, limit, want):
    from surgeon.ops.edit.value_suffix import group_rows

    assert group_rows(lookup, lengths, limit) == want
