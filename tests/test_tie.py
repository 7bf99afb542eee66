"""Relaxed Recursive Transformers (`tie`): slot maps, exactness at full rank, pure recursion at rank 0, the SVD
error bound, shared storage in the loaded compact model, and PEFT equivalence (ALGORITHMS.md §2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgeon.ops.tie.op import Params, apply
from surgeon.ops.tie.plan import shared_sources, slot_map
from surgeon.ops.tie.relax import relax_residual

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.formats.recursive import load_recursive
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint
from surgeon.writer import write_graph
from tests.conftest import save_tiny_llama

FULL = 10_000  # any rank >= min(d_in, d_out) is full rank


def _perturb_norms(folder: Path, seed: int = 1) -> None:
    """Random tiny llamas have all-ones norms; give each layer its own so tying norms is visible."""
    f = folder / "model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        if "layernorm" in k:
            sd[k] = 1 + 0.3 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tie") / "src", layers=4, hidden=64, vocab=128)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _graph(path: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(path))


def _tie(src: Path, out: Path, **kw) -> Path:
    write_graph(apply(_graph(src), Params(**kw), Context()), out)
    return out


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids).logits


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# slot maps ----------------------------------------------------------------------------------------------------
def test_slot_maps_follow_the_paper():
    assert slot_map(6, 2, "cycle") == [0, 1, 2, 0, 1, 2]
    assert slot_map(6, 2, "sequence") == [0, 0, 1, 1, 2, 2]
    assert slot_map(6, 3, "cycle") == [0, 1, 0, 1, 0, 1]
    assert slot_map(6, 2, "middle-cycle") == [0, 1, 2, 1, 2, 3]
    assert slot_map(6, 2, "middle-sequence") == [0, 1, 1, 2, 2, 3]
    assert slot_map(30, 2, "cycle")[15] == 0


def test_loops_must_divide_layers():
    with pytest.raises(SurgeonError, match="does not divide the 6 layers"):
        slot_map(6, 4, "cycle")
    with pytest.raises(SurgeonError, match="middle layers"):
        slot_map(6, 3, "middle-cycle")


def test_shared_sources_stepwise_keeps_first_and_last():
    slots = slot_map(8, 2, "cycle")
    assert shared_sources(slots, "stepwise") == [[0], [2], [5], [7]]  # round(linspace(0, 7, 4))
    assert shared_sources(slots, "lower") == [[0], [1], [2], [3]]
    assert shared_sources(slots, "average") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mid = slot_map(6, 2, "middle-cycle")  # unique ends keep themselves; stepwise runs over the middle 1..4
    assert shared_sources(mid, "stepwise") == [[0], [1], [4], [5]]


def _reference_stepwise_sources(n_layers: int, loops: int, pattern: str) -> list[int]:
    """Mixture-of-Recursions ``selection_initialize`` (stepwise): src_idxs = [round(x) for x in np.linspace(...)]
    over all layers (cycle/sequence) or layers 1..L-2 (middle-*), one per shared slot, in slot order."""
    import numpy as np

    if pattern.startswith("middle"):
        k = (n_layers - 2) // loops
        return [round(x) for x in np.linspace(1, n_layers - 2, k)]
    k = n_layers // loops
    return [round(x) for x in np.linspace(0, n_layers - 1, k)]


@pytest.mark.parametrize("n_layers,loops,pattern", [(18, 2, "cycle"), (22, 2, "sequence"), (26, 2, "cycle"),
                                                    (20, 2, "middle-cycle"), (30, 2, "cycle"), (8, 2, "cycle")])
def test_stepwise_rounds_half_to_even_like_the_reference(n_layers, loops, pattern):
    slots = slot_map(n_layers, loops, pattern)
    tied = [k for k in range(max(slots) + 1) if slots.count(k) > 1]
    ours = [shared_sources(slots, "stepwise")[k][0] for k in tied]
    assert ours == _reference_stepwise_sources(n_layers, loops, pattern)


def test_stepwise_at_18_layers_picks_layer_8_not_9():
    # linspace(0, 17, 9)[4] = 8.5: half-up rounding gave 9, the reference's round() gives 8
    assert [s[0] for s in shared_sources(slot_map(18, 2, "cycle"), "stepwise")] == [0, 2, 4, 6, 8, 11, 13, 15, 17]


# the paper's claims on a tiny llama --------------------------------------------------------------------------
def test_full_rank_all_three_forms_equal_the_original(src, ids, tmp_path):
    ref = _logits(_hf(src), ids)
    compact = load_recursive(str(_tie(src, tmp_path / "c", rank=FULL)))
    dense = _hf(_tie(src, tmp_path / "m", rank=FULL, materialize=True))
    from peft import PeftModel

    base = _tie(src, tmp_path / "b", rank=FULL, tied_base=True)
    relaxed = PeftModel.from_pretrained(_hf(base), base / "lora")
    for name, model in (("compact", compact), ("materialized", dense), ("peft", relaxed)):
        err = (_logits(model, ids) - ref).abs().max().item()
        assert err < 1e-5, (name, err)
    # and the tied base alone (no LoRA) is a different model: the relaxation is doing the work
    assert (_logits(_hf(base), ids) - ref).abs().max().item() > 1e-2


def test_rank_zero_is_a_pure_recursive_model(src, ids, tmp_path):
    out = _tie(src, tmp_path / "c", rank=0)  # init auto -> stepwise
    names = set(open_checkpoint(out).tensors)
    assert not any("lora" in n for n in names)
    assert not any(n.startswith("model.layers.") for n in names)
    assert sum(n.startswith("model.shared_layers.") for n in names) == 2 * 9  # K = 2 slots × 9 tensors
    rec = json.loads((out / "config.json").read_text())["recursion"]
    assert rec["layer_to_slot"] == [0, 1, 0, 1] and rec["init"] == "stepwise" and rec["shared_sources"] == [[0], [3]]
    # stepwise: slot 0 = layer 0, slot 1 = layer 3 of the source, bit for bit
    src_ck, ck = open_checkpoint(src), open_checkpoint(out)
    for s in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(ck.load(f"model.shared_layers.1.{s}"), src_ck.load(f"model.layers.3.{s}"))
    # the loaded model equals a vanilla 4-layer model whose layers are [L0, L3, L0, L3]
    dense = _hf(_tie(src, tmp_path / "m", rank=0, materialize=True))
    m = dense.model.layers
    for a, b in ((0, 2), (1, 3)):
        for (_, p), (_, q) in zip(m[a].named_parameters(), m[b].named_parameters()):
            assert torch.equal(p, q)
    assert (_logits(load_recursive(str(out)), ids) - _logits(dense, ids)).abs().max().item() < 1e-5


def test_reconstruction_error_is_the_dropped_singular_energy(src, tmp_path):
    rank = 5
    g = apply(_graph(src), Params(rank=rank, init="average", svd="exact", materialize=True), Context())
    stats = {(e["layer"], e["module"]): e for e in json.loads(g.extra_files["recursion.json"])["modules"]}
    src_g = _graph(src)
    for layer, module in ((0, "self_attn.q_proj.weight"), (3, "mlp.down_proj.weight"), (1, "self_attn.k_proj.weight")):
        w = src_g.value(f"model.layers.{layer}.{module}").double()
        partner = src_g.value(f"model.layers.{(layer + 2) % 4}.{module}").double()
        shared = (w + partner) / 2
        sigma = torch.linalg.svdvals(w - shared)
        dropped = sigma[rank:].pow(2).sum().sqrt().item()
        approx = g.value(f"model.layers.{layer}.{module}").double()
        assert abs((w - approx).norm().item() - dropped) < 1e-4 * max(1.0, dropped)
        assert abs(stats[(layer, module)]["error"] - dropped) < 1e-4 * max(1.0, dropped)
        kept = sigma[:rank].pow(2).sum() / sigma.pow(2).sum()
        assert abs(stats[(layer, module)]["retained_energy"] - kept.item()) < 1e-5
        # average init: the two partners' residuals are ±the same matrix
        assert abs(stats[(layer, module)]["residual_norm"] - sigma.norm().item()) < 1e-4


def test_relax_residual_rank_is_capped_and_randomized_is_near_exact():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, 12, generator=g)
    full = relax_residual(r, 100)
    assert full.up.shape == (40, 12) and full.error < 1e-4 and full.retained_energy == pytest.approx(1.0)
    low = torch.randn(200, 8, generator=g) @ torch.randn(8, 150, generator=g) + 1e-3 * torch.randn(200, 150,
                                                                                                      generator=g)
    exact = relax_residual(low, 8, method="exact")
    rand = relax_residual(low, 8, method="randomized")
    assert rand.error == pytest.approx(exact.error, rel=1e-2)
    assert (rand.up @ rand.down - exact.up @ exact.down).norm() < 1e-2 * low.norm()


def test_loaded_compact_model_shares_storage(src, tmp_path):
    model = load_recursive(str(_tie(src, tmp_path / "c", rank=4)))
    layers = model.model.layers
    for a, b in ((0, 2), (1, 3)):
        q_a, q_b = layers[a].self_attn.q_proj, layers[b].self_attn.q_proj
        assert q_a.base.weight.data_ptr() == q_b.base.weight.data_ptr()
        assert q_a.lora_A.data_ptr() != q_b.lora_A.data_ptr()  # each unrolled layer keeps its own LoRA
        assert layers[a].input_layernorm.weight.data_ptr() == layers[b].input_layernorm.weight.data_ptr()
    assert layers[0].mlp.down_proj.base.weight.data_ptr() != layers[1].mlp.down_proj.base.weight.data_ptr()
    # unique parameters: embeddings + head + norm + K=2 shared blocks + 4 layers × 7 LoRA pairs
    counts = json.loads((tmp_path / "c" / "recursion.json").read_text())["parameters"]
    assert sum(p.numel() for p in model.parameters()) == counts["compact"]
    assert counts["recursive_layers"] * 2 == counts["original_layers"]


def test_peft_adapter_gives_the_materialized_logits(src, ids, tmp_path):
    from peft import PeftModel

    base = _tie(src, tmp_path / "b", rank=6, tied_base=True)
    dense = _hf(_tie(src, tmp_path / "m", rank=6, materialize=True))
    cfg = json.loads((base / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6 and len(cfg["target_modules"]) == 4 * 7
    relaxed = PeftModel.from_pretrained(_hf(base), base / "lora")
    assert (_logits(relaxed, ids) - _logits(dense, ids)).abs().max().item() < 1e-5
    compact = load_recursive(str(_tie(src, tmp_path / "c", rank=6)))
    assert (_logits(compact, ids) - _logits(dense, ids)).abs().max().item() < 1e-5


def test_rank_pattern_targets_and_capped_gqa_ranks(src, ids, tmp_path):
    # k/v have 32 rows (2 kv heads × 16): rank 48 is capped at 32 and recorded in rank_pattern/alpha_pattern
    p = Params(rank=0, rank_pattern="attn=48,mlp.down=3", init="average", tied_base=True)
    assert p.rank_pattern == {"attn": 48, "mlp.down": 3}
    g = apply(_graph(src), p, Context())
    ranks = json.loads(g.extra_files["recursion.json"])["ranks"]
    assert ranks["0:self_attn.k_proj.weight"] == 32 and ranks["0:self_attn.q_proj.weight"] == 48
    assert ranks["2:mlp.down_proj.weight"] == 3 and "1:mlp.up_proj.weight" not in ranks
    write_graph(g, tmp_path / "b")
    from peft import PeftModel

    relaxed = PeftModel.from_pretrained(_hf(tmp_path / "b"), tmp_path / "b" / "lora")
    dense = _hf(_tie(src, tmp_path / "m", rank=0, rank_pattern={"attn": 48, "mlp.down": 3}, init="average",
                     materialize=True))
    assert (_logits(relaxed, ids) - _logits(dense, ids)).abs().max().item() < 1e-5
    only_q = apply(_graph(src), Params(rank=4, targets=["attn.q"]), Context())
    assert {k.split(":")[1] for k in json.loads(only_q.extra_files["recursion.json"])["ranks"]} == {
        "self_attn.q_proj.weight"}


def test_untie_norms_keeps_each_layers_norms(tmp_path, ids):
    src = save_tiny_llama(tmp_path / "src", seed=3)
    _perturb_norms(src)
    ref = _logits(_hf(src), ids)
    kept = load_recursive(str(_tie(src, tmp_path / "k", rank=FULL, untie_norms=True)))
    assert (_logits(kept, ids) - ref).abs().max().item() < 1e-5
    tied = _tie(src, tmp_path / "t", rank=FULL)  # the paper ties norms: averaged, so no longer exact
    ck, s = open_checkpoint(tied), open_checkpoint(src)
    avg = (s.load("model.layers.1.input_layernorm.weight") + s.load("model.layers.3.input_layernorm.weight")) / 2
    assert torch.allclose(ck.load("model.shared_layers.1.input_layernorm.weight"), avg)
    assert (_logits(load_recursive(str(tied)), ids) - ref).abs().max().item() > 1e-3


def test_middle_cycle_keeps_the_ends_unique(tmp_path, ids):
    src = save_tiny_llama(tmp_path / "src", layers=6, seed=2)
    g = apply(_graph(src), Params(loops=2, pattern="middle-cycle", rank=3), Context())
    names = set(g.names())
    assert sum(n.startswith("model.shared_layers.") and n.endswith("q_proj.weight") for n in names) == 4
    assert not any(n.startswith(("model.layers.0.", "model.layers.5.")) for n in names)  # residual 0: no LoRA
    assert "model.layers.3.self_attn.q_proj.lora_A.weight" in names
    src_g = _graph(src)
    assert torch.equal(g.value("model.shared_layers.3.mlp.up_proj.weight"),
                       src_g.value("model.layers.5.mlp.up_proj.weight"))


def test_bad_input_is_refused_before_reading(src):
    with pytest.raises(SurgeonError, match="does not divide"):
        apply(_graph(src), Params(loops=3), Context())
    with pytest.raises(ValueError, match="exclusive"):
        Params(materialize=True, tied_base=True)
    with pytest.raises(ValueError, match="unknown module key"):
        Params(rank_pattern={"mlp.fc9": 3})
    with pytest.raises(ValueError, match="key=rank"):
        Params(rank_pattern="mlp:3")
    with pytest.raises(ValueError):
        Params(extra_knob=1)
    with pytest.raises(SurgeonError, match="recursion"):
        load_recursive(str(src))


def test_python_face_run_op(src, ids, tmp_path):
    api = pytest.importorskip("surgeon.api")
    res = api.run_op("tie", str(src), output=str(tmp_path / "o"), loops=2, rank=FULL, device="cpu")
    ref = _logits(_hf(src), ids)
    assert (_logits(load_recursive(res["output"]), ids) - ref).abs().max().item() < 1e-5


def test_gpt2_conv1d_full_rank_all_forms(tmp_path):
    """GPT-2 stores Conv1D weights transposed ([d_in, d_out]), has biases and a tied head."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    compact = load_recursive(str(_tie(tmp_path / "src", tmp_path / "c", rank=FULL, untie_norms=True)))
    dense = _hf(_tie(tmp_path / "src", tmp_path / "m", rank=FULL, untie_norms=True, materialize=True))
    base = _tie(tmp_path / "src", tmp_path / "b", rank=FULL, untie_norms=True, tied_base=True)
    assert json.loads((base / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    relaxed = PeftModel.from_pretrained(_hf(base), base / "lora")
    for name, m in (("compact", compact), ("materialized", dense), ("peft", relaxed)):
        assert (_logits(m, ids) - ref).abs().max().item() < 1e-5, name


def _reference_relaxed_weights(sd: dict[str, torch.Tensor], n_layers: int, loops: int, rank: int,
                               alpha_multiplier: float) -> dict[str, torch.Tensor]:
    """Mixture-of-Recursions code, cycle sharing, average init: W' = mean of the tied layers, LoRA from the SVD
    of W_l − W' (B = U_r diag(S_r), A = V_r), PEFT alpha = rank · alpha_pattern, so layer l computes
    W' + (alpha / r) · B A."""
    base_depth = n_layers // loops
    out = {}
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    for i in range(base_depth):
        idxs = [i + rec * base_depth for rec in range(loops)]
        for key in keys:
            src = sum(sd[f"model.layers.{j}.{key}.weight"].float() for j in idxs) / loops
            for t in idxs:
                u, s, v = torch.linalg.svd(sd[f"model.layers.{t}.{key}.weight"].float() - src, full_matrices=False)
                r = min(rank, *src.shape)
                lora_a, lora_b = v[:r, :], u[:, :r] @ torch.diag(s[:r])
                alpha = r * alpha_multiplier
                out[f"model.layers.{t}.{key}.weight"] = src + (alpha / r) * (lora_b @ lora_a)
    return out


def test_lora_alpha_ratio_2_reproduces_the_reference_code(src, ids, tmp_path):
    dense_dir = _tie(src, tmp_path / "m", rank=6, init="average", materialize=True, lora_alpha_ratio=2.0, svd="exact")
    expect = _reference_relaxed_weights(load_file(src / "model.safetensors"), 4, 2, 6, 2.0)
    got = load_file(dense_dir / "model.safetensors")
    for name, w in expect.items():
        assert torch.allclose(got[name].float(), w, atol=2e-5), name
    # the three output forms agree at ratio 2 too; the adapter records lora_alpha = 2r
    base = _tie(src, tmp_path / "b", rank=6, init="average", tied_base=True, lora_alpha_ratio=2.0, svd="exact")
    cfg = json.loads((base / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 12
    from peft import PeftModel

    dense = _logits(_hf(dense_dir), ids)
    relaxed = PeftModel.from_pretrained(_hf(base), base / "lora")
    assert (_logits(relaxed, ids) - dense).abs().max().item() < 1e-5
    compact = load_recursive(str(_tie(src, tmp_path / "c", rank=6, init="average", lora_alpha_ratio=2.0,
                                      svd="exact")))
    assert (_logits(compact, ids) - dense).abs().max().item() < 1e-5
    # default ratio 1 is the paper's init: W' + BA, exact at full rank (checked above), not the reference's W' + 2BA
    ours = load_file(_tie(src, tmp_path / "m1", rank=6, init="average", materialize=True, svd="exact")
                     / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.allclose(ours[name].float(), expect[name], atol=1e-3)
