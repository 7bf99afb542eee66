"""Prompt embeddings exactly as a Stable Diffusion pipeline makes them, from the checkpoint's own text encoder.

SD1.x/2.x: ``last_hidden_state``; SDXL: ``hidden_states[-2]`` of both encoders concatenated (the pooled
embedding is not used by cross-attention). Prompts are padded to the tokenizer's ``model_max_length`` (77) with no
attention mask, as the pipelines do. The text encoder runs on the model engine as an encoder-only stack: built on the meta
device, its blocks read from the graph one at a time, so nothing is initialised randomly and no network is used.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
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


def clip_text_stack(graph: Graph, spec: TextEncoderSpec, device: str = "cpu", micro_batch: int = 16):
    """The encoder as an engine stack (:class:`surgeon.engine.encoder.EncoderStack`): a ``CLIPTextModel`` built on
    ``meta`` whose blocks are read from the graph (its current tensors) one at a time, in float32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from surgeon.arch.diffusion import clip_text_stack_paths
    from surgeon.engine.encoder import EncoderStack, StackPaths

    names = spec.state_names(graph.names())
    names.pop("text_projection.weight", None)  # SDXL's CLIPTextModelWithProjection head: unused here
    cfg = dict(spec.config) if spec.config else infer_clip_text_config({k: graph[g].shape for k, g in names.items()})
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    config = CLIPTextConfig(**cfg)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    expected = [k for k, _ in model.named_parameters()]
    missing = [k for k in expected if k.removeprefix("text_model.") not in names]
    if missing:
        raise SurgeonError(f"{spec.component}: text encoder tensor {spec.strip}{missing[0].removeprefix('text_model.')}"
                           f" is missing ({len(missing)} missing)")
    for mod_name, mod in model.named_modules():
        for b_name, buf in list(mod.named_buffers(recurse=False)):
            if b_name != "position_ids":
                raise SurgeonError(f"{spec.component}: cannot materialise buffer {mod_name}.{b_name}")
            mod.register_buffer(b_name, torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                                persistent=False)
    layers, final_norm = clip_text_stack_paths(model)
    return EncoderStack(graph, model, {k: names[k.removeprefix("text_model.")] for k in expected},
                        StackPaths(layers, final_norm), device=device, micro_batch=micro_batch)


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
    """Encodes prompts with every text encoder of the layout; each distinct prompt is encoded once.

    Each encoder runs on the model engine as an encoder-only stack (:func:`clip_text_stack`): a call embeds all
    its prompts, then runs one block at a time over them in micro-batches of ``batch_size``."""

    def __init__(self, graph: Graph, layout: SDLayout, device: str = "cpu", batch_size: int = 16, *, ctx):
        self.layout = layout
        self.device = device
        self.batch_size = batch_size
        self.tokenizers, self.stacks = [], []
        names = graph.names()
        for s in layout.encoders:
            nested = any(n.startswith(s.prefix + "text_model.") for n in names)
            if layout.kind == "diffusers" and not nested:  # transformers-5 CLIPTextModel folders
                self.tokenizers.append(ctx.tokenizer(graph, component=s.tokenizer_dir.name))
            else:  # CompVis files and text_model.-nested folders (CLIPTextModelWithProjection, transformers < 5)
                self.tokenizers.append(load_clip_tokenizer(s, ctx))
            self.stacks.append(clip_text_stack(graph, s, device, micro_batch=batch_size))
        self.cache: dict[str, tuple[torch.Tensor, int]] = {}

    @property
    def max_length(self) -> int:
        n = int(self.tokenizers[0].model_max_length)
        return n if n < 100_000 else int(self.stacks[0].config.max_position_embeddings)

    @property
    def dim(self) -> int:
        return sum(m.config.hidden_size for m in self.stacks)

    @torch.inference_mode()
    def _encode_new(self, prompts: list[str]) -> None:
        done = 0
        for hidden, lengths in self._encode_batches(prompts):
            for p, h, n in zip(prompts[done:], hidden, lengths):
                self.cache[p] = (h, int(n))
            done += hidden.shape[0]

    @torch.inference_mode()
    def gram(self, prompts: list[str]) -> torch.Tensor:
        """Σ over prompts and all positions of h hᵀ (float64 ``[d, d]``), accumulated per micro-batch without
        caching (the artist preset's 1,733 names: their hidden states spill to disk past the engine's budget)."""
        H = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for hidden, _ in self._encode_batches(prompts):
            rows = hidden.reshape(-1, hidden.shape[-1])
            H += rows.T @ rows
        return H

    def _encode_batches(self, prompts: list[str]) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Per micro-batch of ``prompts`` (in order): hidden states ``[b, L, d]`` (float64, CPU; every encoder's,
        concatenated) and word-token counts."""
        if not prompts:
            return
        streams, lengths = [], None
        for tok, stack, spec in zip(self.tokenizers, self.stacks, self.layout.encoders):
            cfg = stack.config
            length = tok.model_max_length if tok.model_max_length < 100_000 else \
                cfg.max_position_embeddings  # tokenizers saved without model_max_length
            enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            if enc["input_ids"].shape[1] > cfg.max_position_embeddings:
                raise SurgeonError(f"{spec.component}: tokenizer pads to {enc['input_ids'].shape[1]} tokens but the "
                                   f"encoder has {cfg.max_position_embeddings} positions")
            last = stack.n_layers - (1 if spec.layer == "penultimate" else 0)  # hidden_states[-2]: no last block
            streams.append(stack.outputs(enc["input_ids"], blocks=last))
            if lengths is None:
                lengths = word_token_counts(enc["input_ids"], enc["attention_mask"], tok)
        done = 0
        for parts in zip(*streams):
            hidden = torch.cat([h.to(torch.float64).cpu() for h in parts], dim=-1)
            yield hidden, list((lengths or [])[done:done + hidden.shape[0]])
            done += hidden.shape[0]

    def encode(self, prompts: list[str]) -> Encoded:
        new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if new:
            self._encode_new(new)
        if not prompts:
            return Encoded(torch.zeros(0, self.max_length, self.dim, dtype=torch.float64), [])
        return Encoded(torch.stack([self.cache[p][0] for p in prompts]), [self.cache[p][1] for p in prompts])
