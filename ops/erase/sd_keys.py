"""Where the parts of a Stable Diffusion checkpoint live: diffusers folders and CompVis single files.

A diffusers pipeline folder opens as one graph whose names are prefixed by component (``unet/…``,
``text_encoder/…``); a CompVis single file (``sd-v1-4.safetensors``) keeps its original names
(``model.diffusion_model.…``, ``cond_stage_model.transformer.text_model.…``). Only the cross-attention key/value
projections and the text encoder weights are located here; nothing is renamed in the graph, so the output keeps
the input's layout.

The names themselves (CompVis prefixes, UNet order, the CLIP config from shapes) are :mod:`surgeon.arch.diffusion`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.arch.diffusion import (
    COMPVIS_CLIP,
    COMPVIS_OPENCLIP,
    COMPVIS_SDXL,
    COMPVIS_UNET,
    XATTN_K,
    unet_order,
)
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.graph import Graph

@dataclass
class TextEncoderSpec:
    """One text encoder: where its weights are, its config (None: infer from shapes), its tokenizer folder."""

    component: str  # "text_encoder" / "text_encoder_2" / "cond_stage_model"
    prefix: str  # graph-name prefix of its weights
    strip: str  # removed from graph names to get CLIPTextModel names (then "text_model." is dropped too)
    config: dict[str, Any] | None
    tokenizer_dir: Path | None
    layer: str  # "last" (last_hidden_state) or "penultimate" (hidden_states[-2], SDXL)

    def state_names(self, graph_names: list[str]) -> dict[str, str]:
        """CLIPTextModel name without the ``text_model.`` level -> graph name, for this encoder's tensors.

        transformers < 5 and CompVis files nest the text model under ``text_model.``; transformers 5 does not."""
        out = {}
        for n in graph_names:
            if n.startswith(self.prefix):
                out[n[len(self.strip):].removeprefix("text_model.")] = n
        return out


@dataclass
class SDLayout:
    kind: str  # "diffusers" | "compvis"
    unet_prefix: str
    pairs: list[tuple[str, str]]  # (to_k, to_v) graph names, in UNet order (down, mid, up)
    encoders: list[TextEncoderSpec] = field(default_factory=list)

    @property
    def is_sdxl(self) -> bool:
        return len(self.encoders) == 2


def cross_attention_pairs(names: list[str], prefix: str) -> list[tuple[str, str]]:
    """(to_k, to_v) weight names of every cross-attention layer under ``prefix``."""
    names_set = set(names)
    pairs = []
    for n in names:
        if n.startswith(prefix) and n.endswith(XATTN_K):
            v = n[: -len(XATTN_K)] + "attn2.to_v.weight"
            if v not in names_set:
                raise SurgeonError(f"{n}: cross-attention key projection without its value projection {v!r}")
            pairs.append((n, v))
    return sorted(pairs, key=lambda p: unet_order(p[0]))


def _tokenizer_dir_from_side_files(graph: Graph, sub: str) -> Path | None:
    for rel in ("vocab.json", "tokenizer.json", "tokenizer_config.json"):
        p = graph.side_files.get(f"{sub}/{rel}")
        if p is not None:
            return Path(p).parent
    return None


def detect_layout(graph: Graph, ctx, tokenizer: str | None = None) -> SDLayout:
    """Find the UNet's cross-attention projections and the text encoder(s); raise naming what is missing."""
    names = graph.names()
    if any(n.startswith("unet/") for n in names):
        return _diffusers_layout(graph, names)
    if any(n.startswith(COMPVIS_UNET) for n in names):
        return _compvis_layout(graph, names, tokenizer, ctx)
    raise SurgeonError("model: no diffusion UNet found (expected a diffusers folder with unet/ or a Stable Diffusion "
                       "single file with model.diffusion_model.* tensors)")


def _diffusers_layout(graph: Graph, names: list[str]) -> SDLayout:
    pairs = cross_attention_pairs(names, "unet/")
    if not pairs:
        raise SurgeonError("unet: no cross-attention layers (attn2.to_k/to_v); the UNet is not text-conditioned")
    encoders = []
    for i, sub in enumerate(("text_encoder", "text_encoder_2")):
        if not any(n.startswith(sub + "/") for n in names):
            if i == 0:
                raise SurgeonError("model: no text encoder (text_encoder/ weights); concepts cannot be encoded")
            break
        tok_sub = "tokenizer" if i == 0 else "tokenizer_2"
        tok = _tokenizer_dir_from_side_files(graph, tok_sub)
        if tok is None:
            raise SurgeonError(f"model: no {tok_sub}/ folder (vocab.json, merges.txt) next to {sub}/")
        cfg = graph.configs.get(sub)
        if cfg is None:
            raise SurgeonError(f"{sub}/config.json: missing")
        encoders.append(TextEncoderSpec(sub, sub + "/", sub + "/", cfg, tok, "last"))
    if len(encoders) == 2:  # SDXL: penultimate hidden states of both encoders, concatenated
        for e in encoders:
            e.layer = "penultimate"
    return SDLayout("diffusers", "unet/", pairs, encoders)


def _compvis_layout(graph: Graph, names: list[str], tokenizer: str | None, ctx) -> SDLayout:
    pairs = cross_attention_pairs(names, COMPVIS_UNET)
    if not pairs:
        raise SurgeonError(f"{COMPVIS_UNET}*: no cross-attention layers (attn2.to_k/to_v); "
                           "the UNet is not text-conditioned")
    if any(n.startswith(COMPVIS_SDXL) for n in names) or any(n.startswith(COMPVIS_OPENCLIP) for n in names):
        raise SurgeonError("single-file SD2.x/SDXL checkpoints (OpenCLIP text encoder) are not mapped; convert the "
                           "file to a diffusers folder first (diffusers' from_single_file + save_pretrained)")
    if not any(n.startswith(COMPVIS_CLIP) for n in names):
        raise SurgeonError(f"model: no text encoder ({COMPVIS_CLIP}* tensors); concepts cannot be encoded")
    tok_dir, cfg = _resolve_tokenizer_source(tokenizer, ctx)
    enc = TextEncoderSpec("cond_stage_model", COMPVIS_CLIP, COMPVIS_CLIP, cfg, tok_dir, "last")
    return SDLayout("compvis", COMPVIS_UNET, pairs, [enc])


def _resolve_tokenizer_source(tokenizer: str | None, ctx) -> tuple[Path | None, dict[str, Any] | None]:
    """--tokenizer for single files: a diffusers pipeline folder (its tokenizer/ and text_encoder/config.json) or a
    tokenizer folder (optionally with a CLIP text config.json). None: the OpenAI CLIP tokenizer from the Hub cache."""
    if tokenizer is None:
        return None, None
    p = Path(tokenizer).expanduser()
    if not p.is_dir():
        raise SurgeonError(f"--tokenizer {tokenizer}: not a folder (expected a diffusers pipeline folder or a "
                           "CLIP tokenizer folder with vocab.json and merges.txt)")
    cfg_path = None
    if (p / "model_index.json").is_file():
        cfg_path = p / "text_encoder" / "config.json"
        p = p / "tokenizer"
    elif (p / "config.json").is_file():
        cfg_path = p / "config.json"
    if not ((p / "vocab.json").is_file() or (p / "tokenizer.json").is_file()):
        raise SurgeonError(f"--tokenizer {p}: no vocab.json/tokenizer.json")
    cfg = None
    if cfg_path is not None and cfg_path.is_file():
        cfg = ctx.read_json(str(cfg_path), what="--tokenizer")
        if cfg.get("model_type") not in (None, "clip_text_model"):
            cfg = None
    return p, cfg
