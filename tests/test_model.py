"""Materialising a graph as a module: same logits as from_pretrained, one read per tensor, changes flow back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.model import decode_step, load_tokenizer, materialize, write_back
from surgeon.sources import open_checkpoint

V = 96


def lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` in fp32 for ``input_ids`` (moved to the model's device), without grad."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        kw: dict[str, Any] = {"input_ids": input_ids.to(dev), "use_cache": False}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask.to(dev)
        return model(**kw).logits.float()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def _save(kind: str, folder: Path) -> Path:
    import transformers as tf

    torch.manual_seed(1)
    if kind == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64))
    elif kind == "llama-tied":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64, tie_word_embeddings=True))
    elif kind == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64,
                                             bos_token_id=0, eos_token_id=0))
    elif kind == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                           word_embed_proj_dim=32, vocab_size=V, max_position_embeddings=64,
                                           pad_token_id=1, bos_token_id=0, eos_token_id=2))
    else:
        raise ValueError(kind)
    # perturb norms and biases away from their init so a mix-up between tensors cannot go unnoticed
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(folder, safe_serialization=True)
    return folder


def _graph(folder: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(folder))


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2", "opt"])
def test_materialized_logits_equal_from_pretrained(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    folder = _save(kind, tmp_path / kind)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = materialize(_graph(folder))
    assert not model.training
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lm_logits(model, ids), lm_logits(ref, ids), atol=1e-6, rtol=0)
    if kind in ("llama-tied", "gpt2", "opt"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_each_tensor_is_read_once_and_not_copied(tmp_path, monkeypatch):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    ck = g.sources[0]
    reads: list[str] = []
    orig = type(ck).load

    def spy(self, name):
        reads.append(name)
        return orig(self, name)

    monkeypatch.setattr(type(ck), "load", spy)
    model = materialize(g)  # fp32 checkpoint, fp32 module: the loaded tensor *is* the parameter
    assert sorted(reads) == sorted(g.names())
    n_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_graph_bytes = sum(g[n].nbytes for n in g.names())
    assert n_param_bytes == n_graph_bytes
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_bf16_checkpoint_runs_in_the_compute_dtype(tmp_path):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "bf", layers=2, hidden=32, vocab=V, dtype=torch.bfloat16)
    g = _graph(folder)
    m32 = materialize(g, dtype="float32")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    mbf = materialize(g, dtype="bfloat16")
    assert {p.dtype for p in mbf.parameters()} == {torch.bfloat16}
    # unchanged weights compare equal in the graph's dtype: nothing is written back
    out = write_back(g, m32)
    assert all(out.nodes[n] is g.nodes[n] for n in g.names())
    with pytest.raises(SurgeonError, match="dtype"):
        materialize(g, dtype="int8")


def test_changed_parameter_flows_back_and_is_written(tmp_path):
    from surgeon.graph import Const
    from surgeon.writer import write_graph

    folder = _save("gpt2", tmp_path / "m")
    g = _graph(folder)
    model = materialize(g)
    name = "transformer.h.1.mlp.c_fc.weight"
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] += 1.5
        model.transformer.wte.weight[7, 0] -= 0.25  # tied: one tensor in the graph
    out = write_back(g, model)
    changed = [n for n in g.names() if out.nodes[n] is not g.nodes[n]]
    assert sorted(changed) == sorted([name, "transformer.wte.weight"])
    assert isinstance(out.nodes[name], Const) and "lm_head.weight" not in out.nodes
    assert all(g.nodes[n] is g.nodes[n] for n in g.names())  # the input graph is untouched
    # the Const is a snapshot, not a view of the live parameter
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] += 100
    expected = g.value(name).clone()
    expected[3, 5] += 1.5
    assert torch.equal(out.value(name), expected)
    write_graph(out, tmp_path / "out")
    again = _graph(tmp_path / "out")
    assert torch.equal(again.value(name), expected)
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    m2 = materialize(again)
    assert torch.allclose(lm_logits(m2, ids), lm_logits(materialize(out), ids), atol=0, rtol=0)


def test_write_back_rtol_and_names(tmp_path):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    model = materialize(g)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1 + 1e-7)
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    assert len([n for n in g.names() if write_back(g, model).nodes[n] is not g.nodes[n]]) == 2
    out = write_back(g, model, rtol=1e-4)
    assert [n for n in g.names() if out.nodes[n] is not g.nodes[n]] == ["model.layers.1.mlp.down_proj.weight"]
    out = write_back(g, model, names=["model.layers.0.mlp.down_proj.weight"])
    assert [n for n in g.names() if out.nodes[n] is not g.nodes[n]] == ["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(SurgeonError, match="not a parameter"):
        write_back(g, model, names=["nope"])
    with pytest.raises(SurgeonError, match="materialize"):
        write_back(g, torch.nn.Linear(2, 2))


def test_missing_tensor_is_named(tmp_path):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    del g.nodes["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(SurgeonError, match="model.layers.1.mlp.up_proj.weight"):
        materialize(g)
    g = _graph(folder)
    g.configs[""] = {}
    with pytest.raises(SurgeonError, match="config"):
        materialize(g)
    with pytest.raises(SurgeonError, match="kind"):
        materialize(_graph(folder), kind="seq2seq")


def test_decode_step_matches_full_forward(tmp_path):
    folder = _save("llama", tmp_path / "m")
    model = materialize(_graph(folder))
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))
    full = lm_logits(model, ids)
    with torch.no_grad():
        last, cache = decode_step(model, ids[:, :8])
        nxt, _ = decode_step(model, ids[:, 8:], cache)
    assert torch.allclose(last, full[:, 7], atol=1e-5)
    assert torch.allclose(nxt, full[:, 8], atol=1e-5)


def test_tokenizer_comes_from_the_side_files(tmp_path):
    from surgeon.data import save_word_tokenizer

    folder = _save("llama", tmp_path / "m")
    with pytest.raises(SurgeonError, match="no tokenizer files"):
        load_tokenizer(_graph(folder))
    save_word_tokenizer(folder, ["alpha", "beta", "gamma"])
    tok = load_tokenizer(_graph(folder))
    assert tok("alpha gamma", add_special_tokens=False)["input_ids"] == [4, 6]
    assert tok.eos_token == "<eos>"


def _save_pipeline(root: Path) -> Path:
    """A tiny diffusers-style folder: unet/, text_encoder/, tokenizer/ and model_index.json."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from surgeon.data import save_word_tokenizer

    torch.manual_seed(2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    unet.save_pretrained(root / "unet")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, pad_token_id=1,
                                      bos_token_id=2, eos_token_id=3))
    te.save_pretrained(root / "text_encoder")
    save_word_tokenizer(root / "tokenizer", ["a", "photo", "of", "cat", "dog"])
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    return root


def test_unet_and_clip_text_encoder_materialize(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = _save_pipeline(tmp_path / "pipe")
    g = _graph(root)
    from safetensors.torch import load_file

    unet = materialize(g, kind="unet")
    # oracle: the class built from the same config with the file's state dict loaded (fresh, aligned storage)
    ref = UNet2DConditionModel.from_config(g.configs["unet"]).eval()
    ref.load_state_dict(load_file(root / "unet" / "diffusion_pytorch_model.safetensors"))
    # from_pretrained computes on tensors mapped at unaligned file offsets; CPU GEMMs then round differently
    # (~1e-7 relative), so it is compared at 1e-5
    ref_fp = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = unet(x, 10, enc).sample
        assert torch.allclose(out, ref(x, 10, enc).sample, atol=1e-6, rtol=0)
        assert torch.allclose(out, ref_fp(x, 10, enc).sample, atol=1e-5, rtol=0)
    te = materialize(g, kind="clip-text")
    ref_te = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(te(ids).last_hidden_state, ref_te(ids).last_hidden_state, atol=1e-6, rtol=0)
    tok = load_tokenizer(g, "text_encoder")
    assert tok("a photo of cat", add_special_tokens=False)["input_ids"] == [4, 5, 6, 7]
    # an edit of a cross-attention key flows back under its pipeline name
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.zero_()
    out = write_back(g, unet)
    changed = [n for n in g.names() if out.nodes[n] is not g.nodes[n]]
    assert changed == ["unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
