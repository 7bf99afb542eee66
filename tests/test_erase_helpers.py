"""Tiny Stable Diffusion checkpoints for the erase tests: a diffusers folder and a CompVis-named single file.

(Helpers only; the module has no tests of its own besides a smoke check of the builder.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

WORDS = ["nudity", "naked", "cat", "dog", "car", "tree", "art", "painting", "by", "of", "photo", "a", "van", "gogh",
         "church", "the", "house", "red", "blue", "style", "image", "picture", "portrait", "artwork"]


def tiny_clip_vocab(words: list[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A word-level CLIP BPE vocabulary: single letters, then left-to-right merges that spell each word."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges: list[str] = []
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for s in syms[1:]:
            m = f"{cur} {s}"
            cur = cur + s
            if m not in merges:
                merges.append(m)
            if cur not in tokens:
                tokens.append(cur)
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tiny_tokenizer(folder: Path) -> Path:
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


def tiny_unet(cross_dim: int = 32, seed: int = 0, cross_attention: bool = True):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    down = ("CrossAttnDownBlock2D", "DownBlock2D") if cross_attention else ("DownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D") if cross_attention else ("UpBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if cross_attention else None,
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8)
    # random init leaves some zero projections (to_out/proj_out); perturb so every block matters
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def tiny_clip(hidden: int = 32, seed: int = 1, vocab_size: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab, _ = tiny_clip_vocab()
    cfg = CLIPTextConfig(vocab_size=vocab_size or len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 1,
                         max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def save_tiny_sd(folder: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, text_encoder: bool = True,
                 cross_attention: bool = True) -> Path:
    """``model_index.json`` + ``unet/`` + ``text_encoder/`` + ``tokenizer/`` (+ a scheduler), diffusers layout."""
    from diffusers import DDPMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    tiny_unet(seed=seed, cross_attention=cross_attention).to(dtype).save_pretrained(folder / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "feature_extractor": [None, None],
             "safety_checker": [None, None], "requires_safety_checker": False}
    if text_encoder:
        tiny_clip(seed=seed + 1).to(dtype).save_pretrained(folder / "text_encoder")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    save_tiny_tokenizer(folder / "tokenizer")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def save_compvis_copy(diffusers_folder: Path, out_file: Path) -> Path:
    """A CompVis-named single file of the tiny pipeline. Only the names the erase op reads are mapped faithfully
    (cross-attention blocks by the CompVis numbering, the text encoder under cond_stage_model.transformer.);
    the other UNet tensors keep their diffusers paths under model.diffusion_model."""
    from safetensors.torch import load_file, save_file

    unet = load_file(diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors")
    text = load_file(diffusers_folder / "text_encoder" / "model.safetensors")
    out = {}
    for k, v in unet.items():
        try:
            name = diffusers_to_compvis_attention(k, layers_per_block=1)
        except ValueError:
            name = k
        out["model.diffusion_model." + name] = v
    for k, v in text.items():
        out["cond_stage_model.transformer." + k] = v
    out["first_stage_model.decoder.conv_out.weight"] = torch.randn(3, 4, 3, 3)
    save_file(out, out_file, metadata={"format": "pt"})
    return out_file


def test_tiny_sd_builds(tmp_path: Path):
    from transformers import CLIPTokenizer

    folder = save_tiny_sd(tmp_path / "sd")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    enc = tok(["nudity", "a red cat", " "], padding="max_length", max_length=77, return_tensors="pt")
    assert enc["input_ids"].shape == (3, 77)
    assert enc["attention_mask"].sum(-1).tolist() == [3, 5, 2]


# ---- CompVis <-> diffusers names of the cross-attention layers (SD1.x block numbering) --------------------

def diffusers_to_compvis_attention(name: str, layers_per_block: int = 2) -> str:
    """``down_blocks.1.attentions.0.X`` -> ``input_blocks.4.1.X`` etc. (module path inside the UNet)."""
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"input_blocks.{1 + i * (layers_per_block + 1) + j}.1.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", name)
    if m:
        return f"middle_block.1.{m.group(1)}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"output_blocks.{i * (layers_per_block + 1) + j}.1.{rest}"
    raise ValueError(f"not a UNet attention path: {name}")


def compvis_to_diffusers_attention(name: str, layers_per_block: int = 2) -> str:
    """Inverse of :func:`diffusers_to_compvis_attention`."""
    m = re.match(r"input_blocks\.(\d+)\.1\.(.*)", name)
    if m:
        k = int(m.group(1)) - 1
        return f"down_blocks.{k // (layers_per_block + 1)}.attentions.{k % (layers_per_block + 1)}.{m.group(2)}"
    m = re.match(r"middle_block\.1\.(.*)", name)
    if m:
        return f"mid_block.attentions.0.{m.group(1)}"
    m = re.match(r"output_blocks\.(\d+)\.1\.(.*)", name)
    if m:
        k = int(m.group(1))
        return f"up_blocks.{k // (layers_per_block + 1)}.attentions.{k % (layers_per_block + 1)}.{m.group(2)}"
    raise ValueError(f"not a CompVis UNet attention path: {name}")
