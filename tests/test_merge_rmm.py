"""RMM: p = n reverts exactly; with p < n the error equals the dropped singular energy; centred latent adapters are
exact at p = 2; end-to-end merge → revert (adapter and dense); bad input (p ≥ n, LoRA for another base)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from surgeon.ops.merge import revert, rmm

from surgeon.errors import SurgeonError
from surgeon.writer import write_graph
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import context_for, perturbed_copy, save_lora, state

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_p_equals_n_reverts_exactly():
    x = torch.randn(50, 8, 3)
    basis, coeffs, mean, _ = rmm.rmm_fit(x, 3)
    back = torch.stack([rmm.rmm_revert(basis, coeffs, mean, i) for i in range(3)], -1)
    assert float((back - x).abs().max()) < 1e-5


def test_error_equals_dropped_singular_energy():
    torch.manual_seed(1)
    x = torch.randn(40, 8, 5)
    for p in (1, 2, 4):
        basis, coeffs, mean, sq = rmm.rmm_fit(x, p)
        back = torch.stack([rmm.rmm_revert(basis, coeffs, mean, i) for i in range(5)], -1)
        err = float((back - x).pow(2).sum())
        dropped = float(sq[:, p:].sum())
        print(f"p={p}: ‖X − X̂‖² = {err:.5f}, dropped σ² = {dropped:.5f}")
        assert err == pytest.approx(dropped, rel=1e-4)


def test_mean_plus_two_latents_exact_at_p2_when_centred():
    torch.manual_seed(2)
    mu, u, v = torch.randn(30, 6), torch.randn(30, 6), torch.randn(30, 6)
    coef = torch.randn(5, 2)
    x = torch.stack([mu + c[0] * u + c[1] * v for c in coef], -1)
    basis, coeffs, mean, _ = rmm.rmm_fit(x, 2, center=True)
    back = torch.stack([rmm.rmm_revert(basis, coeffs, mean, i) for i in range(5)], -1)
    assert float((back - x).abs().max()) < 1e-4
    basis, coeffs, mean, _ = rmm.rmm_fit(x, 2, center=False)  # uncentred needs p = 3 for this family
    back = torch.stack([rmm.rmm_revert(basis, coeffs, mean, i) for i in range(5)], -1)
    assert float((back - x).abs().max()) > 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmm")
    base = save_tiny_llama(root / "base", layers=2, hidden=32, vocab=64)
    sd = state(base)
    g = torch.Generator().manual_seed(0)
    adapters = {}
    for k in range(3):
        factors = {}
        for m in MODULES:
            w = sd[m + ".weight"]
            factors[m] = (torch.randn(4, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], 4, generator=g) * 0.1)
        adapters[f"task{k}"] = save_lora(root / f"task{k}", factors, r=4, alpha=8)
    return root, base, adapters


def _merge(setup, p=2, **kw):
    _root, base, adapters = setup
    graph, ctx = context_for({"base": base, **adapters}, base="base")
    return rmm.merge_rmm(graph, rmm.RmmParams(p=p, **kw), ctx), ctx


def test_merge_and_revert_adapter_and_dense(setup, tmp_path):
    _root, base, adapters = setup
    g, _ctx = _merge(setup, p=2)
    meta = json.loads(g.extra_files["rmm.json"])
    print(f"rmm p=2 n=3: retained energy {meta['retained_energy']:.4f}, storage {meta['storage_ratio']:.3f}, "
          f"rel. errors {meta['relative_error']}")
    assert meta["storage_ratio"] == pytest.approx(2 * (4 + 3) / (4 * 3))  # p(r + n) / (r n) per position
    assert 0 < meta["retained_energy"] < 1
    out = write_graph(g, tmp_path / "merged")["output"]
    assert sorted(p.name for p in Path(out).iterdir()) >= ["README.md", "rmm.json", "rmm.safetensors"]
    # revert task1 as an adapter: its ΔW matches the reported relative error
    graph, rctx = context_for({out: out})
    ad = revert.merge_revert(graph, revert.RevertParams(task="task1"), rctx)
    from safetensors.torch import load_file

    orig = load_file(str(adapters["task1"] / "adapter_model.safetensors"))
    num = den = 0.0
    for m in MODULES:
        a, b = orig[f"base_model.model.{m}.lora_A.weight"], orig[f"base_model.model.{m}.lora_B.weight"]
        ra, rb = ad.value(f"base_model.model.{m}.lora_A.weight"), ad.value(f"base_model.model.{m}.lora_B.weight")
        num += float((rb @ ra - 2.0 * b @ a).pow(2).sum())  # s = 8/4 = 2 folded into B
        den += float((2.0 * b @ a).pow(2).sum())
    rel = (num / den) ** 0.5
    assert rel == pytest.approx(meta["relative_error"]["task1"], rel=1e-3)
    assert json.loads(ad.extra_files["adapter_config.json"])["lora_alpha"] == 4
    # dense: base + B̂Â
    graph, rctx = context_for({"base": base, out: out}, base="base")
    dense = revert.merge_revert(graph, revert.RevertParams(task="1", form="dense"), rctx)
    m = MODULES[1] + ".weight"
    ra, rb = ad.value(f"base_model.model.{MODULES[1]}.lora_A.weight"), ad.value(f"base_model.model.{MODULES[1]}.lora_B.weight")
    assert torch.allclose(dense.value(m), state(base)[m] + rb @ ra, atol=1e-6)


def test_tensor_coefficients_store_about_p_models(setup, tmp_path):
    g, _ = _merge(setup, p=2, coefficients="tensor")
    meta = json.loads(g.extra_files["rmm.json"])
    print(f"rmm tensor-wise coefficients: storage {meta['storage_ratio']:.3f}, energy {meta['retained_energy']:.3f}")
    assert meta["storage_ratio"] == pytest.approx(2 / 3, rel=0.03)
    out = write_graph(g, tmp_path / "m")["output"]
    graph, rctx = context_for({out: out})
    ad = revert.merge_revert(graph, revert.RevertParams(task="task0"), rctx)
    assert ad.value(f"base_model.model.{MODULES[0]}.lora_A.weight").shape == (4, 32)


def test_full_finetunes_pt_svd(setup, tmp_path):
    _root, base, _ = setup
    fts = {f"ft{i}": perturbed_copy(base, tmp_path / f"ft{i}", seed=20 + i, scale=0.01) for i in range(3)}
    graph, ctx = context_for({"base": base, **fts}, base="base")
    g = rmm.merge_rmm(graph, rmm.RmmParams(p=2, rank=8), ctx)
    meta = json.loads(g.extra_files["rmm.json"])
    assert meta["source"] == "pt-svd" and "model.norm.weight" in meta["dense_deltas"]


def test_bad_input(setup, tmp_path):
    with pytest.raises(SurgeonError, match="p=3 must be smaller than the number of models n=3"):
        _merge(setup, p=3)
    _root, _base, adapters = setup
    other = save_tiny_llama(tmp_path / "wide", layers=2, hidden=48, vocab=64)
    graph, ctx = context_for({"base": other, **adapters}, base="base")
    with pytest.raises(SurgeonError, match="another base"):
        rmm.merge_rmm(graph, rmm.RmmParams(p=2), ctx)
