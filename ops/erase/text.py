"""Prompt embeddings exactly as a Stable Diffusion pipeline makes them, from the checkpoint's own text encoder.

SD1.x/2.x: ``last_hidden_state``; SDXL: ``hidden_states[-2]`` of both encoders concatenated (the pooled
embedding is not used by cross-attention). Prompts are padded to the tokenizer's ``model_max_length`` (77) with no
attention mask, as the pipelines do. The text encoder is built on the meta device and its tensors assigned from
the graph, so nothing is initialised randomly and no network is used.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from surgeon.arch.diffusion import infer_clip_text_config
from surgeon.errors import SurgeonError

from .sd_keys import SDLayout, TextEncoderSpec

if TYPE_CHECKING:
    from surgeon.graph import Graph

DEFAULT_CLIP_TOKENIZER = "openai/clip-vit-large-patch14"  # SD1.x's tokenizer, looked up in the local Hub cache only


@dataclass
class Encoded:
    hidden: torch.Tensor  # [n, L, d] float64
    lengths: list[int]  # tokens per prompt including BOS and EOS (attention_mask.sum())


def load_clip_tokenizer(spec: TextEncoderSpec, ctx):
    """The encoder's CLIP tokenizer: from its folder, or (single file) from the local Hub cache only (from_pretrained
    of an absent repo would quietly build an empty tokenizer)."""
    repo = sys.modules[__name__].DEFAULT_CLIP_TOKENIZER
    folder = None if spec.tokenizer_dir is None else str(spec.tokenizer_dir)
    tok = ctx.tokenizer_from(folder, cls="CLIPTokenizer", hub_repo=repo, what=f"{spec.component} tokenizer")
    if tok is None:
        raise SurgeonError("single-file checkpoint: it carries no tokenizer; pass --tokenizer with a diffusers "
                           f"pipeline folder or a CLIP tokenizer folder ({repo} is not in the local Hub cache)")
    if len(tok) <= 3:
        raise SurgeonError(f"{folder or repo}: the CLIP tokenizer has no vocabulary (vocab.json, merges.txt)")
    return tok


def build_clip_text_model(graph: Graph, spec: TextEncoderSpec, device: str = "cpu"):
    """A float32 ``CLIPTextModel`` holding the graph's (current) text encoder tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    names = spec.state_names(graph.names())
    names.pop("text_projection.weight", None)  # SDXL's CLIPTextModelWithProjection head: unused here
    cfg = dict(spec.config) if spec.config else infer_clip_text_config({k: graph[g].shape for k, g in names.items()})
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    config = CLIPTextConfig(**cfg)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    expected = [k for k in model.state_dict() if not k.endswith("position_ids")]
    missing = [k for k in expected if k.removeprefix("text_model.") not in names]
    if missing:
        raise SurgeonError(f"{spec.component}: text encoder tensor {spec.strip}{missing[0]} is missing "
                           f"({len(missing)} missing)")
    state = {k: graph.value(names[k.removeprefix("text_model.")]).to(device=device, dtype=torch.float32)
             for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    for mod_name, mod in model.named_modules():
        for b_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type != "meta":
                continue
            if b_name != "position_ids":
                raise SurgeonError(f"{spec.component}: cannot materialise buffer {mod_name}.{b_name}")
            mod.register_buffer(b_name, torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                                persistent=False)
    return model.eval()


def word_token_counts(ids: torch.Tensor, mask: torch.Tensor, tok) -> list[int]:
    """attention_mask.sum() per prompt (BOS + words + EOS), except that a prompt whose word tokens are all the
    unknown token counts as 2 (it tokenises to nothing the text encoder knows)."""
    counts = mask.sum(-1).tolist()
    unk = getattr(tok, "unk_token_id", None)
    out = []
    for row, n in zip(ids.tolist(), counts):
        words = row[1 : n - 1]
        out.append(2 if words and unk is not None and all(w == unk for w in words) else int(n))
    return out


class PromptEncoder:
    """Encodes prompts with every text encoder of the layout; each distinct prompt is encoded once."""

    def __init__(self, graph: Graph, layout: SDLayout, device: str = "cpu", batch_size: int = 16, *, ctx):
        self.layout = layout
        self.device = device
        self.batch_size = batch_size
        self.tokenizers, self.models = [], []
        names = graph.names()
        for s in layout.encoders:
            nested = any(n.startswith(s.prefix + "text_model.") for n in names)
            if layout.kind == "diffusers" and not nested:
                # the shared model-context path (surgeon.model) for transformers-5 CLIPTextModel folders
                self.tokenizers.append(ctx.tokenizer(graph, component=s.tokenizer_dir.name))
                self.models.append(ctx.module(graph, kind="clip-text", component=s.component))
            else:  # CompVis files and text_model.-nested folders (CLIPTextModelWithProjection, transformers < 5)
                self.tokenizers.append(load_clip_tokenizer(s, ctx))
                self.models.append(build_clip_text_model(graph, s, device))
        self.cache: dict[str, tuple[torch.Tensor, int]] = {}

    @property
    def max_length(self) -> int:
        n = int(self.tokenizers[0].model_max_length)
        return n if n < 100_000 else int(self.models[0].config.max_position_embeddings)

    @property
    def dim(self) -> int:
        return sum(m.config.hidden_size for m in self.models)

    @torch.inference_mode()
    def _encode_new(self, prompts: list[str]) -> None:
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            hidden, lengths = self._encode_batch(chunk)
            for p, h, n in zip(chunk, hidden, lengths):
                self.cache[p] = (h, int(n))

    @torch.inference_mode()
    def gram(self, prompts: list[str]) -> torch.Tensor:
        """Σ over prompts and all positions of h hᵀ (float64 ``[d, d]``), encoded in batches without caching:
        a long preserve list (the artist preset's 1,733 names) never holds all its embeddings at once."""
        H = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for i in range(0, len(prompts), self.batch_size):
            hidden, _ = self._encode_batch(prompts[i : i + self.batch_size])
            rows = hidden.reshape(-1, hidden.shape[-1])
            H += rows.T @ rows
        return H

    def _encode_batch(self, chunk: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states ``[len(chunk), L, d]`` (float64, CPU) and word-token counts of one batch."""
        parts, lengths = [], None
        for tok, model, spec in zip(self.tokenizers, self.models, self.layout.encoders):
            length = tok.model_max_length if tok.model_max_length < 100_000 else \
                model.config.max_position_embeddings  # tokenizers saved without model_max_length
            enc = tok(chunk, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            ids = enc["input_ids"].to(self.device)
            if ids.shape[1] > model.config.max_position_embeddings:
                raise SurgeonError(f"{spec.component}: tokenizer pads to {ids.shape[1]} tokens but the encoder "
                                   f"has {model.config.max_position_embeddings} positions")
            out = model(ids, output_hidden_states=spec.layer == "penultimate")
            h = out.hidden_states[-2] if spec.layer == "penultimate" else out.last_hidden_state
            parts.append(h.to(torch.float64).cpu())
            if lengths is None:
                lengths = word_token_counts(enc["input_ids"], enc["attention_mask"], tok)
        return torch.cat(parts, dim=-1), list(lengths or [])

    def encode(self, prompts: list[str]) -> Encoded:
        new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if new:
            self._encode_new(new)
        if not prompts:
            return Encoded(torch.zeros(0, self.max_length, self.dim, dtype=torch.float64), [])
        return Encoded(torch.stack([self.cache[p][0] for p in prompts]), [self.cache[p][1] for p in prompts])
