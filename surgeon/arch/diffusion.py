"""Stable Diffusion naming: CompVis single-file prefixes, the UNet's cross-attention projections and their
order, and a CLIP text config inferred from tensor shapes.

CompVis UNet block numbering (SD1.x, ``layers_per_block`` = 2): ``input_blocks.{1,2,4,5,7,8}.1`` ↔
``down_blocks.{0,0,1,1,2,2}.attentions.{0,1}``, ``middle_block.1`` ↔ ``mid_block.attentions.0``,
``output_blocks.{3..11}.1`` ↔ ``up_blocks.{1,1,1,2,2,2,3,3,3}.attentions.{0,1,2}``.
"""
from __future__ import annotations

import re
from typing import Any

from surgeon.errors import SurgeonError

COMPVIS_UNET = "model.diffusion_model."
COMPVIS_CLIP = "cond_stage_model.transformer."  # SD1.x: OpenAI CLIP ViT-L/14 in transformers layout
COMPVIS_OPENCLIP = "cond_stage_model.model."  # SD2.x: OpenCLIP layout (not mapped)
COMPVIS_SDXL = "conditioner.embedders."  # SDXL single file (not mapped)
XATTN_K = "attn2.to_k.weight"

_ORDER = {"down_blocks": 0, "input_blocks": 0, "mid_block": 1, "middle_block": 1, "up_blocks": 2, "output_blocks": 2}


def unet_order(name: str) -> tuple:
    """Sort key putting cross-attention layers in UNet order (down/input, mid/middle, up/output; numeric indices)."""
    parts = name.split(".")
    rank = next((_ORDER[p] for p in parts if p in _ORDER), 3)
    return (rank, [int(p) if p.isdigit() else p for p in parts])


def infer_clip_text_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A CLIPTextModel config from tensor shapes (transformers names). Head count assumes 64-wide heads and the
    activation OpenAI CLIP's quick_gelu: true for SD1.x's ViT-L/14; pass a config to override. Names are
    :meth:`TextEncoderSpec.state_names` keys (no ``text_model.`` level)."""
    try:
        vocab, hidden = shapes["embeddings.token_embedding.weight"]
        max_pos = shapes["embeddings.position_embedding.weight"][0]
        inter = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise SurgeonError(f"text encoder: tensor {e.args[0]!r} not found; is this a CLIP text encoder?") from None
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", n)))
    return {"model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": max_pos, "hidden_act": "quick_gelu", "projection_dim": hidden}


def clip_text_stack_paths(module: Any) -> tuple[tuple[str, ...], str]:
    """(encoder block paths in order, final norm path) inside a transformers ``CLIPTextModel``: the text model
    sits under ``text_model.`` before transformers 5 and at the top level from 5 on."""
    base = "text_model." if hasattr(module, "text_model") else ""
    n = len(module.get_submodule(base + "encoder.layers"))
    return tuple(f"{base}encoder.layers.{i}" for i in range(n)), base + "final_layer_norm"
