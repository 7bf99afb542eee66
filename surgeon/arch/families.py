"""The known families as data: layer-prefix templates, role -> tensor-suffix tables, global tensors, fused and
transposed roles (see :mod:`surgeon.arch`)."""
from __future__ import annotations

from typing import Any

_LLAMA_ROLES = {
    "attn.q": "self_attn.q_proj.weight",
    "attn.k": "self_attn.k_proj.weight",
    "attn.v": "self_attn.v_proj.weight",
    "attn.o": "self_attn.o_proj.weight",
    "mlp.gate": "mlp.gate_proj.weight",
    "mlp.up": "mlp.up_proj.weight",
    "mlp.down": "mlp.down_proj.weight",
    "norm.attn": "input_layernorm.weight",
    "norm.mlp": "post_attention_layernorm.weight",
}
_LLAMA_GLOBALS = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight", "final_norm": "model.norm.weight"}

# Gemma 2/3 put a norm before AND after each sub-block; the one *feeding* the MLP is pre_feedforward_layernorm.
_GEMMA2_ROLES = {
    **_LLAMA_ROLES,
    "norm.mlp": "pre_feedforward_layernorm.weight",
    "norm.attn_out": "post_attention_layernorm.weight",
    "norm.mlp_out": "post_feedforward_layernorm.weight",
}

#: family -> layout. ``layers``: candidate layer-prefix templates (first that exists wins); ``roles``: suffixes
#: after the layer prefix; ``fused``: role -> (tensor role it lives in, slice key); ``transposed``: Conv1D roles.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"layers": ["model.layers.{i}."], "roles": _LLAMA_ROLES, **_LLAMA_GLOBALS, "tie_default": False},
    "mistral": {"layers": ["model.layers.{i}."], "roles": _LLAMA_ROLES, **_LLAMA_GLOBALS, "tie_default": False},
    "qwen2": {"layers": ["model.layers.{i}."], "roles": _LLAMA_ROLES, **_LLAMA_GLOBALS, "tie_default": False},
    "qwen3": {"layers": ["model.layers.{i}."],
              "roles": {**_LLAMA_ROLES, "norm.q": "self_attn.q_norm.weight", "norm.k": "self_attn.k_norm.weight"},
              **_LLAMA_GLOBALS, "tie_default": False},
    "gemma": {"layers": ["model.layers.{i}."], "roles": _LLAMA_ROLES, **_LLAMA_GLOBALS, "tie_default": True,
              "norm_offset": True},
    "gemma2": {"layers": ["model.layers.{i}."], "roles": _GEMMA2_ROLES, **_LLAMA_GLOBALS, "tie_default": True,
               "norm_offset": True},
    "gemma3_text": {"layers": ["model.layers.{i}.", "language_model.model.layers.{i}.",
                               "model.language_model.layers.{i}."],
                    "roles": {**_GEMMA2_ROLES, "norm.q": "self_attn.q_norm.weight",
                              "norm.k": "self_attn.k_norm.weight"},
                    "embed": ["model.embed_tokens.weight", "language_model.model.embed_tokens.weight",
                              "model.language_model.embed_tokens.weight"],
                    "lm_head": ["lm_head.weight", "language_model.lm_head.weight"],
                    "final_norm": ["model.norm.weight", "language_model.model.norm.weight",
                                   "model.language_model.norm.weight"],
                    "tie_default": True, "norm_offset": True},
    "phi3": {"layers": ["model.layers.{i}."],
             "roles": {"attn.qkv": "self_attn.qkv_proj.weight", "attn.o": "self_attn.o_proj.weight",
                       "mlp.gate_up": "mlp.gate_up_proj.weight", "mlp.down": "mlp.down_proj.weight",
                       "norm.attn": "input_layernorm.weight", "norm.mlp": "post_attention_layernorm.weight"},
             "fused": {"attn.q": ("attn.qkv", "q"), "attn.k": ("attn.qkv", "k"), "attn.v": ("attn.qkv", "v"),
                       "mlp.gate": ("mlp.gate_up", "gate"), "mlp.up": ("mlp.gate_up", "up")},
             **_LLAMA_GLOBALS, "tie_default": False},
    "gpt2": {"layers": ["transformer.h.{i}."],
             "roles": {"attn.qkv": "attn.c_attn.weight", "attn.o": "attn.c_proj.weight",
                       "mlp.up": "mlp.c_fc.weight", "mlp.down": "mlp.c_proj.weight",
                       "norm.attn": "ln_1.weight", "norm.mlp": "ln_2.weight"},
             "fused": {"attn.q": ("attn.qkv", "q"), "attn.k": ("attn.qkv", "k"), "attn.v": ("attn.qkv", "v")},
             "transposed": ["attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"],
             "embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight", "lm_head": "lm_head.weight",
             "final_norm": "transformer.ln_f.weight", "tie_default": True},
    "gptj": {"layers": ["transformer.h.{i}."],
             "roles": {"attn.q": "attn.q_proj.weight", "attn.k": "attn.k_proj.weight", "attn.v": "attn.v_proj.weight",
                       "attn.o": "attn.out_proj.weight", "mlp.up": "mlp.fc_in.weight", "mlp.down": "mlp.fc_out.weight",
                       "norm.attn": "ln_1.weight"},
             # GPT-J runs attention and MLP in parallel from one norm: norm.mlp is the same tensor as norm.attn.
             "aliases": {"norm.mlp": "norm.attn"},
             "embed": "transformer.wte.weight", "lm_head": "lm_head.weight", "final_norm": "transformer.ln_f.weight",
             "tie_default": False},
    "opt": {"layers": ["model.decoder.layers.{i}."],
            "roles": {"attn.q": "self_attn.q_proj.weight", "attn.k": "self_attn.k_proj.weight",
                      "attn.v": "self_attn.v_proj.weight", "attn.o": "self_attn.out_proj.weight",
                      "mlp.up": "fc1.weight", "mlp.down": "fc2.weight",
                      "norm.attn": "self_attn_layer_norm.weight", "norm.mlp": "final_layer_norm.weight"},
            "embed": "model.decoder.embed_tokens.weight", "pos_embed": "model.decoder.embed_positions.weight",
            "lm_head": "lm_head.weight", "final_norm": "model.decoder.final_layer_norm.weight", "tie_default": True},
    # diffusers UNet2DConditionModel: a "layer" is one transformer block that has cross-attention (attn2).
    "unet": {"layers": "attn2-blocks",
             "roles": {"attn.q": "attn1.to_q.weight", "attn.k": "attn1.to_k.weight", "attn.v": "attn1.to_v.weight",
                       "attn.o": "attn1.to_out.0.weight",
                       "xattn.q": "attn2.to_q.weight", "xattn.k": "attn2.to_k.weight", "xattn.v": "attn2.to_v.weight",
                       "xattn.o": "attn2.to_out.0.weight",
                       "mlp.up": "ff.net.0.proj.weight", "mlp.down": "ff.net.2.weight",
                       "norm.attn": "norm1.weight", "norm.xattn": "norm2.weight", "norm.mlp": "norm3.weight"},
             "tie_default": False},
}

#: config ``model_type`` / diffusers ``_class_name`` -> family
ALIASES = {"gemma3": "gemma3_text", "UNet2DConditionModel": "unet"}
