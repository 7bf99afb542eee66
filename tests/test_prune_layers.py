"""Depth pruning: block influence against a literal per-token loop and transformers' own hidden states; the
written model loads in transformers and equals the original module with those layers deleted."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny_llama, save_tiny_llama_with_tokenizer, word_text
from surgeon.ops.prune.layers import InfluenceMeter, least_influential, shrink_config, token_cosines

from surgeon.errors import SurgeonError


def bi_literal(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """1 − mean_t cos(x_t, y_t), one token at a time with Python floats (0/0 counts as cos 0.5)."""
    a, b = h_in.reshape(-1, h_in.shape[-1]).tolist(), h_out.reshape(-1, h_out.shape[-1]).tolist()
    total = 0.0
    for x, y in zip(a, b):
        nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        cos = sum(p * q for p, q in zip(x, y)) / (nx * ny) if nx and ny else 0.5
        total += 1 - cos
    return total / len(a)


def test_block_influence_equals_the_literal_mean_over_micro_batches():
    g = torch.Generator().manual_seed(0)
    h_in = torch.randn(5, 7, 16, generator=g)
    h_out = h_in + 0.7 * torch.randn(5, 7, 16, generator=g)
    h_in[1, 3] = 0  # a zero vector
    meter = InfluenceMeter(2)
    meter.add(0, h_in[:2], h_out[:2])
    meter.add(0, h_in[2:], h_out[2:])
    meter.add(1, h_in, -h_in + 1e-3)
    bi = meter.influence()
    assert bi[0] == pytest.approx(bi_literal(h_in, h_out), abs=1e-12)
    assert bi[1] == pytest.approx(bi_literal(h_in, -h_in + 1e-3), abs=1e-12)
    assert float(token_cosines(h_in, h_in)[0]) == pytest.approx(1.0)


def test_least_influential():
    assert least_influential([0.3, 0.1, 0.5, 0.1, 0.2], 2) == [1, 3]
    assert least_influential([0.3, 0.1, 0.5, 0.1, 0.2], 3) == [1, 3, 4]
    with pytest.raises(SurgeonError, match="--remove 5"):
        least_influential([0.1] * 5, 5)


def test_shrink_config_fixes_count_and_per_layer_lists():
    cfg = {"num_hidden_layers": 5, "layer_types": ["a", "b", "c", "d", "e"], "rope_theta": 1e4,
           "hidden_size": 5, "other": [1, 2]}
    changed = shrink_config(cfg, 5, [1, 3])
    assert cfg["num_hidden_layers"] == 3
    assert cfg["layer_types"] == ["a", "c", "e"]
    assert cfg["other"] == [1, 2] and cfg["hidden_size"] == 5
    assert changed == ["num_hidden_layers", "layer_types"]


def _reference_without(src, remove: list[int]):
    """The original transformers module with the layers deleted (the definition of a layer-pruned model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for i in sorted(remove, reverse=True):
        del model.model.layers[i]
    model.config.num_hidden_layers = len(model.model.layers)
    return model


@pytest.mark.parametrize("remove", [[1, 3], [0, 4]])
def test_removed_layers_load_in_transformers_and_match_the_deleted_module(tmp_path, remove):
    from transformers import AutoModelForCausalLM

    from surgeon.api import run_op

    src = save_tiny_llama(tmp_path / "src", layers=5)
    out = tmp_path / "out"
    res = run_op("prune.layers", str(src), output=str(out), device="cpu", layers=remove)
    info = res["steps"][0]["info"]
    assert info["removed_layers"] == remove and info["layers_after"] == 3
    model, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert model.config.num_hidden_layers == 3
    ref = _reference_without(src, remove)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, ref(ids, use_cache=False).logits, rtol=0, atol=0)
    from safetensors.torch import load_file

    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    kept = [i for i in range(5) if i not in remove]
    for new, old in enumerate(kept):
        for k in before:
            if k.startswith(f"model.layers.{old}."):
                assert torch.equal(after[k.replace(f"layers.{old}.", f"layers.{new}.")], before[k])
    assert not any(k.startswith(("model.layers.3.", "model.layers.4.")) for k in after)


def test_remove_k_by_block_influence_matches_transformers_hidden_states(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.api import run_op
    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    src = save_tiny_llama_with_tokenizer(tmp_path / "src", layers=6)
    data = tmp_path / "calib.txt"
    data.write_text(word_text(900, seed=3))
    res = run_op("prune.layers", str(src), output=str(tmp_path / "out"), device="cpu", remove=2, data=str(data),
                 seqlen=32, n_windows=6, batch_size=4)
    info = res["steps"][0]["info"]
    # oracle: block inputs/outputs as transformers computes them in one forward pass of the whole model
    windows = Context().tokens(str(data), Graph.from_checkpoint(open_checkpoint(src)), seqlen=32, max_windows=6)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ios: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(6)]
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ios[i].append((a[0], o[0] if isinstance(o, tuple)
                                                                                else o)))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in hooks:
        h.remove()
    expected = [bi_literal(torch.cat([x for x, _ in io]), torch.cat([y for _, y in io])) for io in ios]
    assert info["block_influence"] == pytest.approx(expected, abs=1e-5)
    order = sorted(range(6), key=lambda i: expected[i])
    assert info["removed_layers"] == sorted(order[:2])
    assert info["calibration_windows"] == 6


def test_bad_requests(tmp_path):
    from surgeon.api import run_op
    from surgeon.pipeline import validate_step

    src = save_tiny_llama(tmp_path / "src", layers=3)
    with pytest.raises(SurgeonError, match="out of range"):
        run_op("prune.layers", str(src), output=str(tmp_path / "o1"), layers=[3])
    with pytest.raises(SurgeonError, match="leaves none"):
        run_op("prune.layers", str(src), output=str(tmp_path / "o2"), layers=[0, 1, 2])
    with pytest.raises(SurgeonError, match="at most 2"):
        run_op("prune.layers", str(src), output=str(tmp_path / "o3"), remove=3)
    with pytest.raises(SurgeonError, match="either remove"):
        validate_step("prune.layers", {"remove": 1, "layers": [0]})
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_gpt2_layout(tmp_path):
    """Another family's numbering (``transformer.h.{i}.``) and layer-count key (``n_layer``)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from surgeon.api import run_op

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=4, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "src", safe_serialization=True)
    run_op("prune.layers", str(tmp_path / "src"), output=str(tmp_path / "out"), device="cpu", layers=[2])
    model, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert model.config.n_layer == 3
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    del ref.transformer.h[2]
    ref.config.n_layer = 3
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, ref(ids, use_cache=False).logits, rtol=0, atol=0)
