"""SLERP family, Model Stock, NearSwap, Breadcrumbs, DELLA, SCE, passthrough slices.

Oracles are hand-computed numbers or literal float64 ports (numpy loops written here) of the published formulas /
mergekit 0.1.5's kernels; the equality with mergekit's own outputs is measured by benchmarks/merge_vs_mergekit.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from surgeon.ops.merge import gta, interpolate, slices

from surgeon.errors import SurgeonError
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import context_for, perturbed_copy, state


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    base = save_tiny_llama(root / "base", layers=4, hidden=32, vocab=64)
    return {"base": base, "a": perturbed_copy(base, root / "a", seed=1), "b": perturbed_copy(base, root / "b", seed=2),
            "c": perturbed_copy(base, root / "c", seed=3)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ---- SLERP ------------------------------------------------------------------------------------------------


def _slerp_ref(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ub = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
    dot = float(np.clip(ua @ ub, -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(dot)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_slerp_quarter_circle_and_collinear_fallback():
    out = interpolate.slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    out = interpolate.slerp(1 / 3, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]))  # 30° of 90°, radius 2
    assert torch.allclose(out, torch.tensor([2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]), atol=1e-6)
    a = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(interpolate.slerp(0.25, a, 2 * a), 1.25 * a)  # collinear: linear


def test_slerp_gradient_per_filter_on_a_model(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"]}, base="base")
    spec = {"self_attn": [0.0, 1.0], "mlp": [1.0, 0.5, 0.0], "default": 0.3}
    g = interpolate.merge_slerp(graph, interpolate.SlerpParams(t=spec), ctx)
    s0, sa = state(family["base"]), state(family["a"])
    # t by hand: 4 layers -> positions 0, 1/3, 2/3, 1; self_attn: t = pos; mlp: 1 -> 0.5 -> 0 piecewise
    expect_t = {"model.layers.2.self_attn.q_proj.weight": 2 / 3, "model.layers.1.mlp.up_proj.weight": 1 - 1 / 3,
                "model.layers.3.mlp.down_proj.weight": 0.0, "model.layers.0.input_layernorm.weight": 0.3,
                "lm_head.weight": 0.3, "model.embed_tokens.weight": 0.3}
    for name, t in expect_t.items():
        ref = _slerp_ref(t, _np(s0[name]), _np(sa[name]))
        assert np.abs(_np(g.value(name)) - ref).max() <= 1e-6, name


# ---- NuSLERP / Multi-SLERP / Karcher ---------------------------------------------------------------------


def _nuslerp_rows_ref(t, a, b):
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], b[i]
        c = float(np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1))
        th = math.acos(c)
        out[i] = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    return out


def test_nuslerp_rows_columns_flat():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    rows = interpolate.nuslerp(0.3, a, b, axis="rows")
    assert np.abs(_np(rows) - _nuslerp_rows_ref(0.3, _np(a), _np(b))).max() < 1e-5
    cols = interpolate.nuslerp(0.3, a, b, axis="columns")
    assert np.abs(_np(cols) - _nuslerp_rows_ref(0.3, _np(a).T, _np(b).T).T).max() < 1e-5
    flat = interpolate.nuslerp(0.3, a, b, axis="flat")
    ref = _nuslerp_rows_ref(0.3, _np(a).reshape(1, -1), _np(b).reshape(1, -1)).reshape(5, 7)
    assert np.abs(_np(flat) - ref).max() < 1e-5


def test_multislerp_two_orthogonal_points_and_port():
    # equal weights, orthogonal unit vectors: the tangent step is zero -> normalised mean at 45°, norm 1
    out = interpolate.multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 1.0])
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=g)
    xs = [base + torch.randn(6, 4, generator=g) for _ in range(3)]
    w = np.array([0.2, 0.3, 0.5])
    # port of the barycentric tangent-space step (mergekit's multislerp), float64
    t = np.stack([_np(x - base).ravel() for x in xs])
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    u = t / (norms + 1e-8)
    m = (u * w[:, None]).sum(0)
    m /= np.linalg.norm(m)
    tan = u - (u @ m)[:, None] * m
    step = (tan * w[:, None]).sum(0)
    sn = np.linalg.norm(step) + 1e-8
    ref = (m * math.cos(sn) + step * math.sin(sn) / sn) * float((norms[:, 0] * w).sum())
    ours = interpolate.multislerp(xs, list(w), base=base) - base
    assert np.abs(_np(ours).ravel() - ref).max() < 1e-5


def test_karcher_mean_on_the_circle():
    pts = [torch.tensor([math.cos(a), math.sin(a)]) * r for a, r in ((0.0, 1.0), (math.pi / 3, 2.0),
                                                                     (2 * math.pi / 3, 3.0))]
    out = interpolate.karcher_mean(pts, [1 / 3] * 3, max_iter=50, tol=1e-9)
    # Fréchet mean of 0°, 60°, 120° is 60°; the norm is the mean norm 2
    assert torch.allclose(out, 2 * torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)]), atol=1e-5)
    # unequal weights on an arc: the mean angle is the weighted mean angle
    out = interpolate.karcher_mean(pts[:2], [0.25, 0.75], max_iter=50, tol=1e-9)
    ang = math.atan2(float(out[1]), float(out[0]))
    assert ang == pytest.approx(0.75 * math.pi / 3, abs=1e-5)


# ---- Model Stock / NearSwap -------------------------------------------------------------------------------


def test_model_stock_eq4():
    base = torch.zeros(4)
    same = [torch.tensor([1.0, 2.0, 0.0, 0.0])] * 2
    assert torch.allclose(interpolate.model_stock(base, same), same[0])  # cos 1 -> t = 1: the average
    ortho = [torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])]
    assert torch.equal(interpolate.model_stock(base, ortho), base)  # cos 0 -> t = 0: the base
    g = torch.Generator().manual_seed(2)
    b = torch.randn(8, 3, generator=g)
    ws = [b + torch.randn(8, 3, generator=g) + 0.5 for _ in range(3)]
    offs = [_np(w - b).ravel() for w in ws]
    cos = np.mean([o1 @ o2 / (np.linalg.norm(o1) * np.linalg.norm(o2)) for i, o1 in enumerate(offs)
                   for o2 in offs[i + 1:]])
    t = 3 * cos / (1 + 2 * cos)
    ref = t * np.mean([_np(w) for w in ws], 0) + (1 - t) * _np(b)
    assert np.abs(_np(interpolate.model_stock(b, ws)) - ref).max() < 1e-5
    # filter-wise: one t per row
    fw = interpolate.model_stock(b, ws, filter_wise=True)
    r = 5
    offs = [_np(w - b)[r] for w in ws]
    cos = np.mean([o1 @ o2 / (np.linalg.norm(o1) * np.linalg.norm(o2)) for i, o1 in enumerate(offs)
                   for o2 in offs[i + 1:]])
    t = 3 * cos / (1 + 2 * cos)
    assert np.abs(_np(fw)[r] - (t * np.mean([_np(w)[r] for w in ws], 0) + (1 - t) * _np(b)[r])).max() < 1e-5


def test_nearswap_by_hand():
    a = torch.tensor([0.0, 0.0, 0.0])
    b = torch.tensor([0.05, 0.2, 1.0])
    out = interpolate.nearswap(0.1, a, b)
    # weights: min(1, 0.1/0.05) = 1 -> b; 0.1/0.2 = 0.5 -> 0.1; 0.1/1 -> 0.1·1 = 0.1
    assert torch.allclose(out, torch.tensor([0.05, 0.1, 0.1]))


# ---- Breadcrumbs / DELLA / SCE ----------------------------------------------------------------------------


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = torch.tensor([3.0, -1.0, 10.0, 2.0, -7.0, 5.0, 4.0, -9.0, 6.0, 8.0])
    m = gta.breadcrumbs_mask(tau, density=0.5, gamma=0.1)
    # N = 10: keep 5, drop the 1 largest (10) and the 4 smallest (1, 2, 3, 4) -> keep 5, 6, 7, 8, 9
    assert sorted(tau[m].abs().tolist()) == [5.0, 6.0, 7.0, 8.0, 9.0]
    # density + gamma > 1: keep 9 of 10, so only N − 9 = 1 outlier goes (not γN = 2) and no small entry
    m = gta.breadcrumbs_mask(tau, density=0.9, gamma=0.2)
    assert sorted(tau[m].abs().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert bool(gta.breadcrumbs_mask(tau, density=1.0, gamma=0.1).all())  # density 1: untouched (as mergekit)


def _gta_ref(base, vals, w, masks, consensus, normalize):
    d = np.stack([(_np(v) - _np(base)) * m for v, m in zip(vals, masks)]) * np.array(w)[:, None]
    if consensus:
        s = np.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(d) == s
        mixed, div = (d * agree).sum(0), (np.array(w)[:, None] * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = d.sum(0), np.array(w).sum()
    return _np(base) + (mixed / div if normalize else mixed)


def test_breadcrumbs_ties_port():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(200, generator=g)
    vals = [base + torch.randn(200, generator=g) for _ in range(3)]
    w, dens, gam = [0.5, 1.0, 0.8], [0.6, 0.4, 0.5], [0.05, 0.02, 0.0]
    masks = [_np(gta.breadcrumbs_mask(v - base, d, gm)) for v, d, gm in zip(vals, dens, gam)]
    for consensus in ("none", "sum"):
        out = gta.generalised_task_arithmetic(
            base, vals, w, lambda i, t: t * gta.breadcrumbs_mask(t, dens[i], gam[i]), consensus=consensus,
            normalize=consensus == "sum")
        ref = _gta_ref(base, vals, w, masks, consensus == "sum", consensus == "sum")
        assert np.abs(_np(out) - ref).max() < 1e-5


def test_della_probabilities_and_unbiased_rescale():
    tau = torch.tensor([[1.0, -4.0, 2.0, 3.0, -5.0]])
    p = gta.della_keep_probabilities(tau, density=0.5, epsilon=0.2)
    # ranks of |τ| ascending: 1->0, 2->1/4, 3->2/4, 4->3/4, 5->1; p = 0.3 + 0.4·rank
    assert torch.allclose(p, torch.tensor([[0.3, 0.6, 0.4, 0.5, 0.7]]))
    big = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    kept = gta.della_drop(big, 0.4, 0.1, torch.Generator().manual_seed(1))
    assert abs(float((kept != 0).float().mean()) - 0.4) < 0.01
    assert abs(float(kept.sum() - big.sum())) / float(big.abs().sum()) < 0.01  # E[m/p · τ] = τ
    # larger magnitudes survive more often
    order = big.abs().argsort(dim=1)
    low, high = order[:, :400], order[:, -400:]
    assert float((kept.gather(1, high) != 0).float().mean()) > float((kept.gather(1, low) != 0).float().mean()) + 0.1
    with pytest.raises(SurgeonError, match="epsilon"):
        gta.della_keep_probabilities(tau, density=0.1, epsilon=0.2)


def test_della_seeded_per_tensor(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "b": family["b"]}, base="base")
    p = gta.DellaParams(density=0.5, epsilon=0.1, seed=3)
    g1 = gta.merge_della(graph, p, ctx)
    g2 = gta.merge_della(graph, p, ctx)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(g1.value(name), g2.value(name))
    g3 = gta.merge_della(graph, gta.DellaParams(density=0.5, epsilon=0.1, seed=4), ctx)
    assert not torch.equal(g1.value(name), g3.value(name))


def test_sce_port():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(10, 10, generator=g)
    vals = [base + torch.randn(10, 10, generator=g) * s for s in (1.0, 0.5, 2.0)]
    out = gta.sce_merge(base, vals, select_topk=0.3)
    t = np.stack([_np(v - base) for v in vals])
    var = t.var(0)
    k = int(np.count_nonzero(var) * 0.3)
    mask = np.zeros(var.size)
    mask[np.argsort(-var.ravel())[:k]] = 1
    t = t * mask.reshape(var.shape)
    sign = np.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(t) == sign
    ms = (t ** 2).reshape(3, -1).mean(1)
    w = (ms / ms.sum())[:, None, None] * agree
    ref = _np(base) + (t * w).sum(0) / np.maximum(w.sum(0), 1e-6)
    assert np.abs(_np(out) - ref).max() < 1e-5


def test_per_model_overrides_and_unknown_names(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"], "b": family["b"]}, base="base")
    p = gta.BreadcrumbsParams(density=0.5, per_model={"a": {"density": 0.9, "weight": [0.0, 1.0]}})
    g = gta.merge_breadcrumbs(graph, p, ctx)
    s0, sa, sb = state(family["base"]), state(family["a"]), state(family["b"])
    name = "model.layers.3.self_attn.v_proj.weight"  # last layer: a's weight gradient is 1
    ta, tb = sa[name] - s0[name], sb[name] - s0[name]
    ref = s0[name] + ta * gta.breadcrumbs_mask(ta, 0.9, 0.01) + tb * gta.breadcrumbs_mask(tb, 0.5, 0.01)
    assert torch.allclose(g.value(name), ref, atol=1e-6)
    name0 = "model.layers.0.self_attn.v_proj.weight"  # first layer: a's weight is 0
    ref0 = s0[name0] + (sb[name0] - s0[name0]) * gta.breadcrumbs_mask(sb[name0] - s0[name0], 0.5, 0.01)
    assert torch.allclose(g.value(name0), ref0, atol=1e-6)
    with pytest.raises(SurgeonError, match="'z' is not one of the input models"):
        gta.merge_breadcrumbs(graph, gta.BreadcrumbsParams(per_model={"z": {"density": 0.1}}), ctx)


# ---- passthrough slices ----------------------------------------------------------------------------------


def test_frankenmerge_renumbers_layers_and_config(family):
    graph, ctx = context_for({"a": family["a"], "b": family["b"]})
    p = slices.PassthroughParams(slices=[{"model": "a", "layers": [0, 3]}, {"model": "b", "layers": [1, 4]}])
    g = slices.merge_passthrough(graph, p, ctx)
    sa, sb = state(family["a"]), state(family["b"])
    assert g.config["num_hidden_layers"] == 6
    out = dict(g.values(g.names()))
    for j, (src, i) in enumerate([(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3)]):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{j}.{suffix}"], src[f"model.layers.{i}.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first slice
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])  # last slice
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"])
    assert not any(".layers.6." in n for n in out)


def test_merged_slice_uses_slice_relative_gradient(family):
    graph, ctx = context_for({"base": family["base"], "a": family["a"]})
    p = slices.PassthroughParams(slices=[
        {"sources": [{"model": "base", "layers": [0, 2]}, {"model": "a", "layers": [2, 4]}], "method": "slerp",
         "base": "base", "params": {"t": [0.0, 1.0]}}])
    g = slices.merge_passthrough(graph, p, ctx)
    s0, sa = state(family["base"]), state(family["a"])
    assert g.config["num_hidden_layers"] == 2
    # output layer 1 = slerp(t = 1 within the 2-layer slice) of base layer 1 and a's layer 3
    name = "model.layers.1.mlp.up_proj.weight"
    ref = _slerp_ref(1.0, _np(s0[name]), _np(sa["model.layers.3.mlp.up_proj.weight"]))
    assert np.abs(_np(g.value(name)) - ref).max() < 1e-6
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(g.value(name), s0[name])  # t = 0


def test_depth_upscaling_scale_and_per_layer_config(tmp_path, family):
    src = family["a"]
    cfg = json.loads((src / "config.json").read_text())
    dst = tmp_path / "lt"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg["layer_types"] = ["full_attention", "sliding_attention"] * 2
    (dst / "config.json").write_text(json.dumps(cfg))
    graph, ctx = context_for({"m": dst})
    p = slices.PassthroughParams(slices=[{"model": "m", "layers": [0, 3]},
                                         {"model": "m", "layers": [1, 4], "scale": {"o_proj": 0.0, "default": 1.0}}])
    g = slices.merge_passthrough(graph, p, ctx)
    assert g.config["layer_types"] == ["full_attention", "sliding_attention", "full_attention",
                                       "sliding_attention", "full_attention", "sliding_attention"]
    assert float(g.value("model.layers.4.self_attn.o_proj.weight").abs().max()) == 0.0
    assert float(g.value("model.layers.1.self_attn.o_proj.weight").abs().max()) > 0.0


def test_slice_errors(family):
    graph, ctx = context_for({"a": family["a"], "b": family["b"]})
    with pytest.raises(SurgeonError, match="exceed its 4 layers"):
        slices.merge_passthrough(graph, slices.PassthroughParams(slices=[{"model": "a", "layers": [2, 6]}]), ctx)
    with pytest.raises(ValueError, match="same number of layers"):
        slices.PassthroughParams(slices=[{"sources": [{"model": "a", "layers": [0, 2]},
                                                      {"model": "b", "layers": [0, 3]}], "method": "slerp"}])
    with pytest.raises(SurgeonError, match="'zz' is not one of the input models"):
        slices.merge_passthrough(graph, slices.PassthroughParams(slices=[{"model": "zz", "layers": [0, 2]}]), ctx)
