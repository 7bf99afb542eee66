"""prune.wanda: |W|·‖X‖ scores, exact per-row sparsity, sequential calibration equal to an independent reference."""
from __future__ import annotations

import math

import pytest
import torch
from surgeon.ops.prune import magnitude, wanda
from test_prune_helpers import graph_loss, task_model_fixture  # noqa: F401  (fixture)

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.pipeline import validate_step
from surgeon.sources import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def test_wanda_mask_prunes_lowest_scores_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    sq = torch.rand(32, generator=g) * 10
    mask = wanda.wanda_mask(w, sq, 0.5)
    assert bool((mask.sum(1) == 16).all())
    score = w.abs() * sq.sqrt()
    for r in range(8):
        assert score[r][mask[r]].max() <= score[r][~mask[r]].min()
    # Conv1D storage [in, out]: the same decision, transposed
    assert torch.equal(wanda.wanda_mask(w.T.contiguous(), sq, 0.5, transposed=True), mask.T)
    # N:M: per group of 4 inputs, the 2 lowest scores go
    m24 = wanda.wanda_mask(w, sq, 0.5, nm=(2, 4))
    assert bool((m24.reshape(8, 8, 4).sum(-1) == 2).all())
    # scaling an input column changes the choice (activation-aware, unlike magnitude)
    sq2 = sq.clone()
    sq2[0] = 1e6
    assert not bool(wanda.wanda_mask(w, sq2, 0.5)[:, 0].any())


@pytest.mark.parametrize("k", [0, 1, 7, 16, 31, 32])
def test_lowest_k_per_row_is_a_stable_sorts_first_k_with_ties(k):
    """Oracle: the first k indices of a stable sort. Scores with many ties (small integers, zeros, +inf for
    protected entries) so the lower-column-first rule decides most rows."""
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 4, (64, 32), generator=g).float()
    score[::3, ::5] = math.inf
    want = torch.zeros_like(score, dtype=torch.bool)
    want.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(wanda.lowest_k_per_row(score, k), want)


def _reference_wanda(model, layers_names, tokens, sparsity):
    """Independent reference: per layer, full-model forward passes with hooks (prefix already pruned)."""
    for names in layers_names:
        sums = {}
        mods = dict(model.named_modules())
        hooks = []
        for n in names:
            mod = mods[n.rsplit(".", 1)[0]]

            def hook(m, args, out, n=n, sums=sums):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[n] = sums.get(n, 0) + (x * x).sum(0)

            hooks.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
        for h in hooks:
            h.remove()
        for n in names:
            w = mods[n.rsplit(".", 1)[0]].weight
            score = w.detach().abs() * sums[n].float().sqrt()[None, :]
            k = int(sparsity * w.shape[1])
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            with torch.no_grad():
                w.scatter_(1, idx, 0.0)
    return model


def test_sequential_calibration_equals_reference(task_model):
    g = Graph.from_checkpoint(open_checkpoint(task_model))
    data = str(task_model.parent / "train.txt")
    ctx = Context()
    g2 = wanda.apply(g, wanda.Params(data=data, sparsity=0.5, seqlen=24, n_windows=16, batch_size=5), ctx)
    tokens = ctx.tokens(data, g, seqlen=24, max_windows=16)
    ref = _reference_wanda(ctx.module(g), [[n for n in g.names() if f"layers.{i}." in n and n.endswith("proj.weight")]
                                           for i in range(2)], tokens, 0.5)
    sd = dict(ref.named_parameters())
    for n in g.names():
        if n.endswith("proj.weight"):
            assert torch.equal(g2.value(n) == 0, sd[n] == 0), n
            assert int((g2.value(n) == 0).sum(1).min()) == g[n].shape[1] // 2  # exact per row
    assert ctx.step_info["sparsity"] == pytest.approx(0.5)


def test_wanda_beats_magnitude_on_the_trained_task(task_model):
    g = Graph.from_checkpoint(open_checkpoint(task_model))
    held = task_model.parent / "heldout.txt"
    gw = wanda.apply(g, wanda.Params(data=str(task_model.parent / "train.txt"), sparsity=0.6, seqlen=24), Context())
    gm = magnitude.apply(g, magnitude.Params(sparsity=0.6), Context())
    dense, lw, lm = graph_loss(g, held), graph_loss(gw, held), graph_loss(gm, held)
    print(f"\nheld-out NLL at 60%: dense {dense:.3f}  wanda {lw:.3f}  magnitude {lm:.3f}")
    assert dense < lw < lm


def test_bad_input(tiny_llama):
    with pytest.raises(SurgeonError):
        validate_step("prune.wanda", {"seqlen": 4096})
    with pytest.raises(SurgeonError, match="contradicts"):
        validate_step("prune.wanda", {"nm": "2:4", "sparsity": 0.7})
    g = Graph.from_checkpoint(open_checkpoint(tiny_llama))
    with pytest.raises(SurgeonError, match="inside a decoder block"):
        wanda.apply(g, wanda.Params(include=["lm_head"]), Context())
