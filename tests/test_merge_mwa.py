"""MWA: weights from trainer_state.json (nearest logged loss), sum to 1, monotone, pf = 0 is the uniform mean;
factor-wise and delta-space averaging of LoRA checkpoints; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from surgeon.ops.merge import mwa

from surgeon.errors import SurgeonError
from tests.test_merge_helpers import context_for, save_lora

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
LOSSES = {2: 4.2, 4: 3.9, 10: 3.0, 12: 2.9, 20: 2.2, 22: 2.25, 30: 1.8}


def _run_dir(root: Path, *, steps=(10, 20, 30), r: int = 4, trainer_state: bool = True) -> dict[str, Path]:
    """Checkpoint folders laid out like HF Trainer's, with a log_history of (step, loss)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for step in steps:
        f = root / f"checkpoint-{step}"
        factors = {m: (torch.randn(r, 32, generator=g) * 0.1, torch.randn(32, r, generator=g) * 0.1) for m in MODULES}
        save_lora(f, factors, r=r, alpha=2 * r)
        if trainer_state:
            hist = [{"step": s, "loss": v, "epoch": s / 10} for s, v in LOSSES.items() if s <= step]
            (f / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": hist}))
        out[f.name] = f
    return out


def test_weights_sum_to_one_monotone_and_pf0_uniform():
    scores = [1 / 3.0, 1 / 2.2, 1 / 1.8]
    for pf in (0.5, 1.0, 3.0):
        w = mwa.mwa_weights(scores, pf)
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        assert w[0] < w[1] < w[2]
    assert mwa.mwa_weights(scores, 0.0) == pytest.approx([1 / 3] * 3)
    w = mwa.mwa_weights([10000.0, 20000.0], 50.0)  # no overflow with large steps and pf
    assert sum(w) == pytest.approx(1.0) and w[1] > 0.99


def test_loss_weights_from_trainer_state(tmp_path):
    cks = _run_dir(tmp_path)
    graph, ctx = context_for(cks)
    g = mwa.merge_mwa(graph, mwa.MwaParams(penalty=1.0), ctx)
    table = ctx.step_info["checkpoints"]
    assert [row["metric_step"] for row in table] == [10, 20, 30]
    inv = [1 / 3.0, 1 / 2.2, 1 / 1.8]
    expected = [x / sum(inv) for x in inv]
    got = [row["weight"] for row in table]
    print("mwa weights (loss, pf=1):", [f"{w:.4f}" for w in got])
    assert got == pytest.approx(expected)
    json.loads(g.extra_files["mwa.json"])
    assert json.loads(g.extra_files["adapter_config.json"])["r"] == 4
    # factor-wise average
    a_name = f"base_model.model.{MODULES[0]}.lora_A.weight"
    from safetensors.torch import load_file

    ref = sum(w * load_file(str(cks[f"checkpoint-{s}"] / "adapter_model.safetensors"))[a_name]
              for w, s in zip(expected, (10, 20, 30)))
    assert torch.allclose(g.value(a_name), ref, atol=1e-6)


def test_pf_zero_is_uniform_mean_and_window(tmp_path):
    cks = _run_dir(tmp_path, steps=(10, 20, 30))
    graph, ctx = context_for(cks)
    mwa.merge_mwa(graph, mwa.MwaParams(penalty=0.0, window=2), ctx)
    table = ctx.step_info["checkpoints"]
    assert [row["step"] for row in table] == [20, 30]
    assert [row["weight"] for row in table] == pytest.approx([0.5, 0.5])


def test_step_weighting_and_csv_metrics(tmp_path):
    cks = _run_dir(tmp_path, trainer_state=False)
    graph, ctx = context_for(cks)
    mwa.merge_mwa(graph, mwa.MwaParams(metric="step"), ctx)
    assert [r["weight"] for r in ctx.step_info["checkpoints"]] == pytest.approx([10 / 60, 20 / 60, 30 / 60])
    csv = tmp_path / "m.csv"
    csv.write_text("step,eval_loss\n9,2.0\n21,1.0\n29,0.5\n")
    mwa.merge_mwa(graph, mwa.MwaParams(metrics_file=str(csv), metric_key="eval_loss"), ctx)
    assert [r["eval_loss"] for r in ctx.step_info["checkpoints"]] == [2.0, 1.0, 0.5]


def test_delta_space_full_rank_is_exact(tmp_path):
    cks = _run_dir(tmp_path)
    graph, ctx = context_for(cks)
    g = mwa.merge_mwa(graph, mwa.MwaParams(space="delta", rank=12), ctx)  # 3 checkpoints × r 4 = rank ≤ 12
    weights = [r["weight"] for r in ctx.step_info["checkpoints"]]
    from safetensors.torch import load_file

    pre = f"base_model.model.{MODULES[1]}"
    want = torch.zeros(32, 32)
    for w, s in zip(weights, (10, 20, 30)):
        sd = load_file(str(cks[f"checkpoint-{s}"] / "adapter_model.safetensors"))
        want += w * 2.0 * sd[pre + ".lora_B.weight"] @ sd[pre + ".lora_A.weight"]  # s = alpha/r = 2
    got = g.value(pre + ".lora_B.weight") @ g.value(pre + ".lora_A.weight")
    cfg = json.loads(g.extra_files["adapter_config.json"])
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    err = float((got - want).abs().max())
    print(f"delta space at full rank: max |ΔW − Σ w_i s B_i A_i| = {err:.2e}")
    assert err < 1e-5


def test_missing_trainer_state_and_mixed_runs(tmp_path):
    cks = _run_dir(tmp_path / "a", trainer_state=False)
    graph, ctx = context_for(cks)
    with pytest.raises(SurgeonError, match="missing trainer_state.json"):
        mwa.merge_mwa(graph, mwa.MwaParams(), ctx)
    other = _run_dir(tmp_path / "b", steps=(40,), r=8)
    graph, ctx = context_for({**cks, **other})
    with pytest.raises(SurgeonError, match="differ in adapter_config|shape"):
        mwa.merge_mwa(graph, mwa.MwaParams(metric="step"), ctx)
