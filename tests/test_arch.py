"""Architecture roles: every family's roles resolve to the tensors the transformers model actually has."""
from __future__ import annotations

import pytest
import torch

from surgeon.arch import roles_for
from surgeon.errors import SurgeonError


def _state(model_cls, config) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """Config dict and name->shape of a tiny model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        m = model_cls(config)
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if getattr(m.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # save_pretrained drops the tied head
    return m.config.to_dict(), sd


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _state(LlamaForCausalLM, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))


def test_llama_roles_name_the_real_tensors():
    cfg, sd = _llama()
    r = roles_for(cfg, list(sd))
    assert r.family == "llama" and r.n_layers == 3
    assert r.layer_prefix(2) == "model.layers.2."
    assert r.tensor(1, "attn.k") == "model.layers.1.self_attn.k_proj.weight"
    assert sd[r.tensor(1, "attn.k")] == (16, 32)  # GQA: n_kv * head_dim rows
    assert r.tensor(0, "mlp.down") == "model.layers.0.mlp.down_proj.weight"
    assert r.tensor(0, "norm.mlp") == "model.layers.0.post_attention_layernorm.weight"
    assert r.embed == "model.embed_tokens.weight" and r.lm_head == "lm_head.weight" and not r.tied
    assert r.final_norm == "model.norm.weight"
    assert not r.transposed("mlp.down")
    assert len(r.block_linears(0)) == 7
    assert set(r.block_tensors(0)) == {n for n in sd if n.startswith("model.layers.0.")}


def test_resolver_accepts_names_without_base_prefix():
    cfg, sd = _llama()
    bare = [n.removeprefix("model.") for n in sd]  # a checkpoint saved from the bare base model
    r = roles_for(cfg, bare)
    assert r.tensor(2, "attn.o") == "layers.2.self_attn.o_proj.weight"
    assert r.embed == "embed_tokens.weight" and r.lm_head == "lm_head.weight"


@pytest.mark.parametrize("family", ["gpt2", "gpt2-bare", "opt", "gptj", "phi3", "gemma2", "qwen3", "gemma3_text",
                                    "qwen2", "mistral", "gemma"])
def test_every_family_resolves_core_roles(family):
    import transformers as tf

    small = {"vocab_size": 64}
    if family.startswith("gpt2"):
        cfg, sd = _state(tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, **small))
    elif family == "opt":
        cfg, sd = _state(tf.OPTForCausalLM, tf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64,
                                                         num_attention_heads=2, word_embed_proj_dim=32, **small))
    elif family == "gptj":
        cfg, sd = _state(tf.GPTJForCausalLM, tf.GPTJConfig(n_layer=2, n_embd=32, n_head=2, rotary_dim=8, **small))
    elif family == "phi3":
        cfg, sd = _state(tf.Phi3ForCausalLM, tf.Phi3Config(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                                           num_attention_heads=4, num_key_value_heads=2,
                                                           pad_token_id=0, **small))
    else:
        cls = {"gemma2": "Gemma2", "qwen3": "Qwen3", "gemma3_text": "Gemma3", "qwen2": "Qwen2", "mistral": "Mistral",
               "gemma": "Gemma"}[family]
        conf_cls = getattr(tf, cls + ("TextConfig" if family == "gemma3_text" else "Config"))
        cfg, sd = _state(getattr(tf, cls + "ForCausalLM"),
                         conf_cls(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, **small))
    names = list(sd)
    if family == "gpt2-bare":  # the original gpt2 hub checkpoint has no "transformer." prefix
        names = [n.removeprefix("transformer.") for n in names]
    r = roles_for(cfg, names)
    assert r.n_layers == 2
    for i in range(2):
        for role in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "norm.attn", "norm.mlp"):
            assert r.tensor(i, role) in names, (family, role)
        assert set(r.block_linears(i)) <= set(names)
        assert set(r.block_linears(i)) <= set(r.block_tensors(i))
    # every weight matrix of a block is one of its linears
    mats = {n for n in r.block_tensors(1) if len(sd[n if family != "gpt2-bare" else "transformer." + n]) == 2}
    assert set(r.block_linears(1)) == mats, family
    assert r.embed in names and r.final_norm in names
    assert r.has(0, "mlp.gate") == (family not in ("gpt2", "gpt2-bare", "opt", "gptj"))
    if family in ("gpt2", "gpt2-bare", "opt", "gemma", "gemma2", "gemma3_text"):
        assert r.tied and r.lm_head is None
    if family == "gptj":
        assert not r.tied and r.lm_head == "lm_head.weight"
        assert r.tensor(0, "norm.mlp") == r.tensor(0, "norm.attn")  # parallel block, one norm


def test_gpt2_conv1d_is_transposed_and_qkv_are_column_slices():
    import transformers as tf

    cfg, sd = _state(tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    r = roles_for(cfg, list(sd))
    assert r.transposed("attn.q") and r.transposed("mlp.down") and not r.transposed("norm.attn")
    assert r.tensor(0, "attn.v") == "transformer.h.0.attn.c_attn.weight"
    assert sd[r.tensor(0, "attn.v")] == (32, 96)  # stored [d_in, 3·d_out]
    assert [r.rows(0, x) for x in ("attn.q", "attn.k", "attn.v")] == [(0, 32), (32, 64), (64, 96)]
    assert r.rows(0, "attn.o") is None
    assert r.pos_embed == "transformer.wpe.weight"


def test_phi3_fused_roles_are_row_slices():
    import transformers as tf

    cfg, sd = _state(tf.Phi3ForCausalLM, tf.Phi3Config(num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       pad_token_id=0, vocab_size=64))
    r = roles_for(cfg, list(sd))
    qkv = r.tensor(0, "attn.k")
    assert qkv.endswith("qkv_proj.weight") and sd[qkv] == (32 + 16 + 16, 32)
    assert [r.rows(0, x) for x in ("attn.q", "attn.k", "attn.v")] == [(0, 32), (32, 48), (48, 64)]
    assert [r.rows(0, x) for x in ("mlp.gate", "mlp.up")] == [(0, 48), (48, 96)]
    assert r.block_linears(0).count(qkv) == 1


def test_unet_cross_attention_blocks():
    names = []
    for blk in ("down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "mid_block.attentions.0",
                "up_blocks.1.attentions.10", "up_blocks.1.attentions.2"):
        for t in ("attn1.to_q", "attn1.to_k", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"):
            names.append(f"unet/{blk}.transformer_blocks.0.{t}.weight")
    names.append("unet/conv_in.weight")
    r = roles_for({"_class_name": "UNet2DConditionModel"}, names)
    assert r.family == "unet" and r.n_layers == 5
    assert r.tensor(0, "xattn.k") == "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    # natural order: attentions.2 before attentions.10
    assert r.tensor(3, "xattn.v").startswith("unet/up_blocks.1.attentions.2.")
    assert len(r.select(["xattn.k", "xattn.v"])) == 10
    assert not r.transposed("xattn.k")


def test_selector_grammar():
    cfg, sd = _llama()
    r = roles_for(cfg, list(sd))
    assert r.select("mlp.down") == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    assert r.select("mlp.down[1, 3)") == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert r.select("attn.q[0,2]") == ["model.layers.0.self_attn.q_proj.weight",
                                        "model.layers.2.self_attn.q_proj.weight"]
    assert len(r.select("attn.*")) == 12 and len(r.select("norm.*[0, 1)")) == 2
    assert r.select("re:.*layers\\.1\\..*proj\\.weight") == r.block_linears(1)
    with pytest.raises(SurgeonError, match="matches no tensor"):
        r.select("re:layers")  # full-match semantics: a bare substring does not match
    assert r.select("lm_head") == ["lm_head.weight"]
    assert r.select("model.norm.weight") == ["model.norm.weight"]
    assert r.select("[2, 3)") == r.block_tensors(2)
    assert r.select("linears[0, 1)") == r.block_linears(0)
    # a union comes back in model order without duplicates
    assert r.select(["mlp.up[2,3)", "attn.q", "mlp.up"])[0] == "model.layers.0.self_attn.q_proj.weight"
    assert len(r.select(["mlp.up", "mlp.up[0, 2)"])) == 3


@pytest.mark.parametrize("bad", ["mlp.bogus", "attn.q[2, 9)", "attn.q[3, 1)", "attn.q[a, b)", "re:(", "embed[0,1)",
                                 "no.such.tensor"])
def test_bad_selectors_fail_clearly(bad):
    cfg, sd = _llama()
    r = roles_for(cfg, list(sd))
    with pytest.raises(SurgeonError, match="selector"):
        r.select(bad)


def test_missing_role_names_the_role_and_the_override():
    cfg, sd = _llama()
    names = [n for n in sd if "mlp.down_proj" not in n]
    r = roles_for(cfg, names)
    with pytest.raises(SurgeonError, match=r"'mlp.down'.*arch:"):
        r.tensor(0, "mlp.down")
    assert not r.has(0, "mlp.down")


def test_unknown_family_with_llama_names_borrows_the_layout_and_overrides_fill_gaps():
    names = [f"backbone.blocks.{i}.{t}.weight" for i in range(2) for t in ("wq", "wk", "wv", "wo", "w1", "w2")]
    names += ["backbone.tok.weight", "head.weight"]
    with pytest.raises(SurgeonError, match="unknown architecture"):
        roles_for({"model_type": "mystery"}, names)
    r = roles_for({"model_type": "mystery"}, names,
                  {"layers": "backbone.blocks.{i}.", "attn.q": "wq.weight", "mlp.down": "w2.weight",
                   "embed": "backbone.tok.weight", "lm_head": "head.weight", "transposed": ["mlp.down"]})
    assert r.family == "mystery" and r.n_layers == 2
    assert r.tensor(1, "attn.q") == "backbone.blocks.1.wq.weight"
    assert r.transposed("mlp.down") and r.lm_head == "head.weight"
    with pytest.raises(SurgeonError, match="'attn.k'"):
        r.tensor(0, "attn.k")
    # a llama clone with another model_type resolves without overrides
    cfg, sd = _llama()
    cfg["model_type"] = "granite-like"
    assert roles_for(cfg, list(sd)).tensor(0, "attn.v") == "model.layers.0.self_attn.v_proj.weight"
    with pytest.raises(SurgeonError, match="unknown key"):
        roles_for(cfg, list(sd), {"bogus": 1})


def test_layer_count_mismatch_is_an_error():
    cfg, sd = _llama()
    cfg["num_hidden_layers"] = 5
    with pytest.raises(SurgeonError, match="5 layers"):
        roles_for(cfg, list(sd))
    with pytest.raises(SurgeonError, match="out of range"):
        roles_for({**cfg, "num_hidden_layers": 3}, list(sd)).tensor(3, "attn.q")
