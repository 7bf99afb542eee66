"""Classic merges: exact against plain torch, TIES/DARE semantics, per-layer values, bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from surgeon.ops.merge import classic
from surgeon.ops.merge.values import layer_value

from surgeon.errors import SurgeonError
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import context_for, perturbed_copy, state


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    base = save_tiny_llama(root / "base", layers=2, hidden=32, vocab=64)
    return {"base": base, "a": perturbed_copy(base, root / "a", seed=1), "b": perturbed_copy(base, root / "b", seed=2),
            "c": perturbed_copy(base, root / "c", seed=3, dtype=torch.bfloat16)}


def _all(g):
    return dict(g.values(g.names()))


def test_linear_equals_torch_reference(family):
    graph, ctx = context_for({"a": family["a"], "b": family["b"]})
    g = classic.merge_linear(graph, classic.LinearParams(weights=[0.3, 0.7]), ctx)
    sa, sb = state(family["a"]), state(family["b"])
    out = _all(g)
    worst = max(float((out[k] - (0.3 * sa[k] + 0.7 * sb[k]) / 1.0).abs().max()) for k in sa)
    print(f"linear max |diff| vs torch = {worst:.2e}")
    assert worst <= 1e-6


def test_task_arithmetic_equals_torch_reference(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "b": family["b"]}, base="base")
    g = classic.merge_task_arithmetic(graph, classic.TaskArithmeticParams(weights=[1.0, 0.5], scale=0.8), ctx)
    s0, sa, sb = state(family["base"]), state(family["a"]), state(family["b"])
    out = _all(g)
    worst = max(float((out[k] - (s0[k] + 0.8 * ((sa[k] - s0[k]) + 0.5 * (sb[k] - s0[k])))).abs().max()) for k in s0)
    print(f"task arithmetic max |diff| vs torch = {worst:.2e}")
    assert worst <= 1e-6


def test_ties_reference_semantics():
    base = torch.zeros(2, 3)
    t1 = torch.tensor([[3.0, -1.0, 0.1], [2.0, 0.0, -5.0]])
    t2 = torch.tensor([[-1.0, -2.0, 0.2], [4.0, 1.0, 6.0]])
    out = classic.ties_merge(base, [t1, t2], [1.0, 1.0], density=0.5)
    # trim keeps 3 of 6 per model: t1 -> {3, 2, -5}, t2 -> {-2, 4, 6}
    # [0,0]: only 3 -> 3 ; [0,1]: only -2 -> -2 ; [1,0]: 2, 4 agree -> 3 ; [1,2]: -5 vs 6 -> + wins -> 6
    expected = torch.tensor([[3.0, -2.0, 0.0], [3.0, 0.0, 6.0]])
    assert torch.equal(out, expected)


def test_ties_weighted_election_differs_from_unweighted():
    base = torch.zeros(1)
    vals = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-1.5])]
    w = [1.0, 1.0, 3.0]
    assert float(classic.ties_merge(base, vals, w, density=1.0, election="weighted")) == pytest.approx(-1.5)
    assert float(classic.ties_merge(base, vals, w, density=1.0, election="unweighted")) == pytest.approx(1.0)


def test_ties_graph_matches_function(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "b": family["b"]}, base="base")
    g = classic.merge_ties(graph, classic.TiesParams(density=0.3, weights=[1.0, 2.0]), ctx)
    s0, sa, sb = state(family["base"]), state(family["a"]), state(family["b"])
    name = "model.layers.1.mlp.down_proj.weight"
    ref = classic.ties_merge(s0[name], [sa[name], sb[name]], [1.0, 2.0], density=0.3)
    assert torch.equal(g.value(name), ref)
    delta = g.value(name) - s0[name]
    assert 0.3 <= float((delta != 0).float().mean()) <= 0.6  # union of two 30 % supports


def test_dare_is_deterministic_per_tensor_and_unbiased():
    base = torch.zeros(200, 200)
    t = torch.ones(200, 200)
    a = classic.dare_merge(base, [t], [1.0], density=0.3, seed=7, name="x")
    b = classic.dare_merge(base, [t], [1.0], density=0.3, seed=7, name="x")
    c = classic.dare_merge(base, [t], [1.0], density=0.3, seed=7, name="y")
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = float((a != 0).float().mean())
    assert abs(kept - 0.3) < 0.01
    assert abs(float(a.mean()) - 1.0) < 0.03  # rescale by 1/p keeps the expectation
    nz = a[a != 0]
    assert torch.allclose(nz, torch.full_like(nz, 1 / 0.3))


def test_dtype_output_and_mixed_input_dtypes(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "c": family["c"]}, base="base")
    g = classic.merge_task_arithmetic(graph, classic.TaskArithmeticParams(dtype="bfloat16"), ctx)
    assert all(g[n].dtype == torch.bfloat16 for n in g.names())
    v = g.value("model.norm.weight")
    assert v.dtype == torch.bfloat16


def test_per_layer_values():
    assert layer_value([0.1, 0.2, 0.3], "model.layers.1.mlp.up_proj.weight", 3) == pytest.approx(0.2)
    assert layer_value([0.0, 1.0], "model.layers.2.mlp.up_proj.weight", 5) == pytest.approx(0.5)
    # outside the layers mergekit 0.1.5 plans at t = 0: the first value (embeddings, final norm and LM head alike)
    for outside in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert layer_value([0.25, 1.0], outside, 5) == 0.25
    spec = {"re:.*self_attn\\.(q|k)_proj.*": 0.2, "mlp": [0.0, 1.0], "default": 0.9}
    assert layer_value(spec, "model.layers.0.self_attn.q_proj.weight", 3) == pytest.approx(0.2)
    assert layer_value(spec, "model.layers.1.mlp.gate_proj.weight", 3) == pytest.approx(0.5)
    assert layer_value(spec, "model.layers.1.self_attn.v_proj.weight", 3) == pytest.approx(0.9)
    with pytest.raises(SurgeonError, match="no pattern"):
        layer_value({"mlp": 0.1}, "model.norm.weight", 3)


def test_cli_text_values_parse():
    p = classic.TiesParams(density="0.2,0.8", weights="1,2", scale='{"mlp": 0.5, "default": 1}')
    assert p.density == [0.2, 0.8] and p.weights == [1.0, 2.0] and p.scale == {"mlp": 0.5, "default": 1}
    with pytest.raises(ValueError):
        classic.TiesParams(density=1.5)
    with pytest.raises(ValueError):
        classic.DareParams(density=0.0)
    with pytest.raises(ValueError):
        classic.TiesParams(unknown=1)


def test_mismatched_shapes_name_the_tensor(family, tmp_path):
    other = save_tiny_llama(tmp_path / "other", layers=2, hidden=32, vocab=96)
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "o": other}, base="base")
    with pytest.raises(SurgeonError, match=r"(embed_tokens|lm_head)\.weight.*--backbone-only"):
        classic.merge_ties(graph, classic.TiesParams(), ctx)
    g = classic.merge_ties(graph, classic.TiesParams(backbone_only=True), ctx)
    assert torch.equal(g.value("model.embed_tokens.weight"), state(family["base"])["model.embed_tokens.weight"])
    assert g.value("lm_head.weight").shape == (64, 32)


def test_other_architecture_refused(family, tmp_path):
    deeper = save_tiny_llama(tmp_path / "deeper", layers=3, hidden=32, vocab=64)
    graph, ctx = context_for({"base": family["base"], "d": deeper}, base="base")
    with pytest.raises(SurgeonError, match=r"model\.layers\.2\..* is not in the primary"):
        classic.merge_task_arithmetic(graph, classic.TaskArithmeticParams(), ctx)


def test_wrong_number_of_weights_and_missing_base(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"]}, base="base")
    with pytest.raises(SurgeonError, match="2 values for 1 models"):
        classic.merge_ties(graph, classic.TiesParams(weights=[1, 1]), ctx)
    graph, ctx = context_for({"a": family["a"], "b": family["b"]})
    with pytest.raises(SurgeonError, match="needs a base"):
        classic.merge_ties(graph, classic.TiesParams(), ctx)


def test_nothing_computed_at_plan_time(family, monkeypatch):
    from surgeon.checkpoint import Checkpoint

    calls = []
    orig = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, n: calls.append(n) or orig(self, n))
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "b": family["b"]}, base="base")
    g = classic.merge_ties(graph, classic.TiesParams(), ctx)
    assert calls == []
    g.value("model.norm.weight")
    assert len(calls) == 3


@pytest.mark.parametrize("case", ["random", "zero-ties", "nonzero-ties", "all-zero"])
def test_trim_mask_keeps_exactly_the_k_largest_like_argsort(case):
    """Oracle: mergekit's rule, `argsort(|δ|, descending)[:k]`, written out; ties at zero may be any zeros."""
    from surgeon.ops.merge.classic import trim_mask

    g = torch.Generator().manual_seed(5)
    delta = torch.randn(300, 70, generator=g)
    if case == "zero-ties":
        delta[:, 20:] = 0.0
    elif case == "nonzero-ties":
        delta[::3] = 0.25
    elif case == "all-zero":
        delta.zero_()
    for density in (0.05, 0.3, 0.5, 0.6, 0.9):  # 0.6 cuts through the 0.25 ties
        k = int(density * delta.numel())
        mask = trim_mask(delta, density)
        assert torch.equal(trim_mask(delta.clone(), density, overwrite=True), mask)  # in place: same choice
        expected = torch.zeros(delta.numel(), dtype=torch.bool)
        expected[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = True
        assert int(mask.sum()) == k
        kept = delta.reshape(-1)[mask.reshape(-1)].abs().sort().values
        assert torch.equal(kept, delta.reshape(-1)[expected].abs().sort().values)  # the same magnitudes
        if case != "zero-ties" and case != "all-zero":
            assert torch.equal(mask.reshape(-1), expected)


# ---- mergekit 0.1.5 conventions (issue 20 items 14-16): oracles are literal ports of mergekit's merge_group


def _mergekit_gta(base, values, weights, *, consensus, normalize, lam=1.0):
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group after sparsification (density 1: nothing dropped)."""
    deltas = torch.stack([v - base for v in values])
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus is not None:
        sign = deltas.sign()
        if consensus == "sum":
            majority = (deltas.sum(0) >= 0).float() * 2 - 1
        else:
            majority = (sign.sum(0) >= 0).float() * 2 - 1
        mask = (sign == majority).float()
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def test_dare_ties_defaults_equal_mergekit_at_density_one():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=g)
    vals = [base + torch.randn(16, 8, generator=g) for _ in range(3)]
    w = [0.5, 0.3, 0.9]
    p = classic.DareParams(consensus="ties", density=1.0)
    assert p.normalize is False  # mergekit's dare_ties default
    ours = classic.dare_merge(base, vals, w, density=1.0, seed=0, name="x", consensus="ties", normalize=p.normalize)
    ref = _mergekit_gta(base, vals, w, consensus="sum", normalize=False)
    assert float((ours - ref).abs().max()) <= 1e-6
    normalised = _mergekit_gta(base, vals, w, consensus="sum", normalize=True)
    assert float((ours - normalised).abs().max()) > 0.1  # the old default differs: the test can tell


def test_ties_count_election_equals_mergekit_count():
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(64)
    vals = [torch.randn(64, generator=g) * s for s in (1.0, 3.0, 0.5)]
    w = [1.0, 0.2, 1.0]
    ours = classic.ties_merge(base, vals, w, density=1.0, election="count")
    ref = _mergekit_gta(base, vals, w, consensus="count", normalize=True)
    assert float((ours - ref).abs().max()) <= 1e-6
    weighted = classic.ties_merge(base, vals, w, density=1.0, election="weighted")
    assert not torch.allclose(ours, weighted)
    # one entry where count and sum disagree: two small positives vs one large negative
    x = classic.ties_merge(torch.zeros(1), [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])],
                           [1.0, 1.0, 1.0], density=1.0, election="count")
    assert float(x) == 1.0


def test_dare_l1_rescale_keeps_the_l1_norm():
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(100, 100, generator=g)
    out = classic.dare_drop(tau, 0.3, torch.Generator().manual_seed(0), rescale_norm="l1")
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.02


def test_dare_and_della_seed_is_an_offset_to_the_run_seed(family):
    """The run's seed reaches DARE and DELLA; the op's own seed shifts it (run 5 + op 0 == run 0 + op 5)."""
    from surgeon.ops.merge import gta

    models = {"base": family["base"], "a": family["a"], "b": family["b"]}

    def dare(run_seed: int, op_seed: int) -> dict[str, torch.Tensor]:
        graph, ctx = context_for(models, base="base")
        ctx.seed = run_seed
        return _all(classic.merge_dare(graph, classic.DareParams(density=0.5, seed=op_seed), ctx))

    def della(run_seed: int, op_seed: int) -> dict[str, torch.Tensor]:
        graph, ctx = context_for(models, base="base")
        ctx.seed = run_seed
        return _all(gta.merge_della(graph, gta.DellaParams(density=0.5, epsilon=0.1, seed=op_seed), ctx))

    for merge in (dare, della):
        shifted, offset, plain = merge(5, 0), merge(0, 5), merge(0, 0)
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(shifted[name], offset[name])
        assert not torch.equal(shifted[name], plain[name])
        assert torch.equal(merge(2, 3)[name], shifted[name])
