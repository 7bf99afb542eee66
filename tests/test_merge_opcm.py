"""OPCM invariants: step 1 = θ_1, merged norm = mean task norm, masked block ≈ 0, reduced = full SVD,
resume = one-shot, state size constant in the number of models."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from surgeon.ops.merge import opcm

from surgeon.errors import SurgeonError
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import context_for, perturbed_copy, state


def opcm_project_full(tau: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """Oracle: the reference's form with full square U, V (``full_matrices=True``): τ̃ = U P̃ Vᵀ."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    r = opcm.rank_alpha(s.float(), alpha)
    p = u.T @ tau.double() @ vh.T
    keep = torch.ones_like(p, dtype=torch.bool)
    k = min(p.shape)
    keep[:k, :k] &= ~opcm.projection_mask(k, r)
    return (u @ (p * keep) @ vh).float()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opcm")
    base = save_tiny_llama(root / "base", layers=2, hidden=32, vocab=64)
    out = {"base": base}
    for i, k in enumerate("abcd"):
        out[k] = perturbed_copy(base, root / k, seed=10 + i, scale=0.02)
    return out


def test_projection_zeroes_masked_block_and_matches_full_svd():
    torch.manual_seed(0)
    merged = torch.randn(24, 16) @ torch.diag(torch.logspace(0, -2, 16))
    tau = torch.randn(24, 16)
    t_red, r = opcm.opcm_project(tau, merged, 0.5)
    t_full = opcm_project_full(tau, merged, 0.5)
    assert torch.allclose(t_red, t_full, atol=1e-5)
    u, _s, vh = torch.linalg.svd(merged, full_matrices=False)
    p = u.T @ t_red @ vh.T
    mask = opcm.projection_mask(16, r)
    print(f"r_alpha={r}, max |masked entries| = {float(p[mask].abs().max()):.2e}, "
          f"kept norm = {float(p[~mask].norm()):.3f}")
    assert r >= 1
    assert float(p[mask].abs().max()) < 1e-5
    assert float(p[~mask].norm()) > 1.0


def test_rank_alpha_follows_reference_code():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum/Σ = .4 .7 .9 1
    assert opcm.rank_alpha(s, 0.5) == 1
    assert opcm.rank_alpha(s, 0.3) == 0
    assert opcm.rank_alpha(s, 0.95) == 3


def _run(family, names, *, base="base", **kw):
    models = {"base": family[base], **{n: family[n] for n in names}}
    graph, ctx = context_for(models, base=base)
    g = opcm.merge_opcm(graph, opcm.OpcmParams(**kw), ctx)
    return g, ctx


def test_first_step_equals_first_model(family):
    g, ctx = _run(family, ["a"])
    sa = state(family["a"])
    worst = max(float((g.value(k) - v).abs().max()) for k, v in sa.items())
    print(f"step 1 max |θ^(1) − θ_1| = {worst:.2e}")
    assert worst < 1e-6
    assert ctx.step_info["lambdas"] == [pytest.approx(1.0)]


def test_merged_distance_equals_mean_task_norm(family):
    g, ctx = _run(family, ["a", "b", "c"])
    s0 = state(family["base"])
    dist = math.sqrt(sum(float((g.value(k).double() - v.double()).pow(2).sum()) for k, v in s0.items()))
    norms = [math.sqrt(sum(float((w.double() - s0[k].double()).pow(2).sum()) for k, w in state(family[m]).items()))
             for m in "abc"]
    lams = ctx.step_info["lambdas"]
    print(f"‖θ^(3) − θ_b‖ = {dist:.5f}, mean ‖τ_i‖ = {sum(norms) / 3:.5f}, λ_t = {lams}")
    assert dist == pytest.approx(sum(norms) / 3, rel=1e-5)
    # nearly orthogonal random task vectors: λ_t ≈ √t
    assert lams[1] == pytest.approx(math.sqrt(2), rel=0.05) and lams[2] == pytest.approx(math.sqrt(3), rel=0.05)


def test_resume_equals_one_shot_and_state_is_constant_size(family, tmp_path):
    one, _ = _run(family, ["a", "b", "c", "d"])
    st = tmp_path / "state"
    _run(family, ["a", "b"], state=str(st))
    size2 = sum(f.stat().st_size for f in st.iterdir())
    _g1, _ = _run(family, ["c"], state=str(st), resume=str(st))
    g2, ctx = _run(family, ["d"], state=str(st), resume=str(st))
    size4 = sum(f.stat().st_size for f in st.iterdir())
    worst = max(float((one.value(k) - g2.value(k)).abs().max()) for k in one.names())
    print(f"resume vs one-shot max |diff| = {worst:.2e}; state bytes after 2 models {size2}, after 4 {size4}")
    assert worst < 1e-6
    assert ctx.step_info["count"] == 4
    assert abs(size4 - size2) < 2048  # only the JSON history grows, by a few bytes per model


def test_resume_refuses_other_alpha_and_missing_state(family, tmp_path):
    st = tmp_path / "s"
    _run(family, ["a"], state=str(st))
    with pytest.raises(SurgeonError, match="alpha"):
        _run(family, ["b"], resume=str(st), alpha=0.3)
    with pytest.raises(SurgeonError, match="not an OPCM state"):
        _run(family, ["b"], resume=str(tmp_path / "nothing"))


def test_needs_base(family):
    graph, ctx = context_for({"a": family["a"], "b": family["b"]})
    with pytest.raises(SurgeonError, match="needs a base"):
        opcm.merge_opcm(graph, opcm.OpcmParams(), ctx)


def _reference_cleaned_task_tv(previous_merged_tv: torch.Tensor, task_tv: torch.Tensor, alpha: float) -> torch.Tensor:
    """fusion_bench ``OPCMForCLIP.merge_linear_weights``: full SVD, split_rank by argmax of the boolean test,
    diagonal and leading split_rank block of Uᵀ τ V zeroed."""
    u, s, vh = torch.linalg.svd(previous_merged_tv, full_matrices=True)
    v = vh.T
    split_rank = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()
    projected_task_tv = u.T @ task_tv @ v
    projected_task_tv.diagonal().fill_(0)
    projected_task_tv[:split_rank, :split_rank] = 0
    return u @ projected_task_tv @ v.T


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8, 1.0])
def test_projection_matches_reference_code(alpha):
    g = torch.Generator().manual_seed(3)
    merged = torch.zeros(6, 4)
    merged[0, 0], merged[1, 1], merged[2, 2] = 4.0, 2.0, 1.0  # σ = 4, 2, 1, 0: cumsum/Σ = 4/7, 6/7, 1, 1 exactly
    tau = torch.randn(6, 4, generator=g)
    ours, r = opcm.opcm_project(tau, merged, alpha)
    assert torch.allclose(ours, _reference_cleaned_task_tv(merged, tau, alpha), atol=1e-5)
    # α = 1: nothing passes "> 1", so r_α = 0 and only the diagonal goes (the whole block went before issue 20)
    assert r == {0.3: 0, 0.5: 0, 0.8: 1, 1.0: 0}[alpha]
    dense = torch.randn(5, 7, generator=g)
    ours, _ = opcm.opcm_project(tau[:5, :].repeat(1, 2)[:, :7], dense, alpha)
    assert torch.allclose(ours, _reference_cleaned_task_tv(dense, tau[:5, :].repeat(1, 2)[:, :7], alpha), atol=1e-4)


def test_rank_alpha_is_zero_when_no_fraction_exceeds_alpha():
    assert opcm.rank_alpha(torch.tensor([4.0, 2.0, 1.0, 1.0]), 1.0) == 0  # cumsum/Σ ends at exactly 1
