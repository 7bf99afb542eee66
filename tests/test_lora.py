"""PEFT LoRA: our lazy applier equals peft's merge_and_unload (α/r, rsLoRA, rank/alpha patterns, GPT-2 Conv1D
fan_in_fan_out); our writer's folders load in peft; adapters for another base are refused naming the tensor."""
from __future__ import annotations

import pytest
import torch

from surgeon.errors import SurgeonError
from surgeon.lora import open_adapter, write_peft_adapter
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import graph_of


def _peft_adapter(base_dir, out, *, rslora=False, patterns=False, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                     rank_pattern={"down_proj": 2} if patterns else {},
                     alpha_pattern={"v_proj": 3} if patterns else {}, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("rslora,patterns", [(False, False), (True, False), (False, True)])
def test_lazy_applier_equals_merge_and_unload(tmp_path, rslora, patterns):
    base = save_tiny_llama(tmp_path / "base", layers=2, hidden=32, vocab=64)
    want = _peft_adapter(base, tmp_path / "ad", rslora=rslora, patterns=patterns)
    ad = open_adapter(tmp_path / "ad")
    g = ad.apply_to(graph_of(base))
    worst = max(float((g.value(k) - v).abs().max()) for k, v in want.items() if k in g)
    print(f"rslora={rslora} patterns={patterns}: max |ours − merge_and_unload| = {worst:.2e}")
    assert worst < 1e-6
    if patterns:
        assert ad.modules["model.layers.0.mlp.down_proj"].rank == 2
        assert ad.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3 / 4)


def test_fan_in_fan_out_gpt2(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64))
    m.save_pretrained(tmp_path / "gpt2")
    pm = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    want = pm.merge_and_unload().state_dict()
    g = open_adapter(tmp_path / "ad").apply_to(graph_of(tmp_path / "gpt2"))
    name = next(n for n in g.names() if n.endswith("0.attn.c_attn.weight"))
    assert torch.allclose(g.value(name), want[name] if name in want else want["transformer." + name], atol=1e-6)


def test_writer_output_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base", layers=2, hidden=32, vocab=64)
    torch.manual_seed(3)
    factors = {"model.layers.0.self_attn.q_proj": (torch.randn(3, 32), torch.randn(32, 3)),
               "model.layers.1.mlp.up_proj": (torch.randn(5, 32), torch.randn(64, 5))}
    write_peft_adapter(tmp_path / "ours", factors, base_model=str(base))
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ours")
    merged = pm.merge_and_unload().state_dict()
    sd0 = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for m, (a, b) in factors.items():
        assert torch.allclose(merged[m + ".weight"] - sd0[m + ".weight"], b @ a, atol=1e-5)  # s = 1
    g = open_adapter(tmp_path / "ours").apply_to(graph_of(base))
    assert torch.allclose(g.value("model.layers.1.mlp.up_proj.weight"), merged["model.layers.1.mlp.up_proj.weight"],
                          atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path):
    base = save_tiny_llama(tmp_path / "base", layers=2, hidden=32, vocab=64)
    other = save_tiny_llama(tmp_path / "other", layers=2, hidden=48, vocab=64)
    _peft_adapter(base, tmp_path / "ad")
    with pytest.raises(SurgeonError, match=r"_proj\.weight.*another base"):
        open_adapter(tmp_path / "ad").apply_to(graph_of(other))
    with pytest.raises(SurgeonError, match="not a PEFT adapter"):
        open_adapter(base)
