"""Helpers for the pruning/PERP tests: a tiny Llama trained in a few seconds on a task that needs its blocks.

Task: text over a 16-word vocabulary where word i is a fixed permutation of word i−2 (the model must attend two
positions back). A trained model predicts all but the first two words of a window exactly. Text files hold
paragraphs of 239 words (+ <eos> = 240 tokens = 10 windows of 24), so windows never straddle two paragraphs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

V = 16
WINDOW = 24  # tokens per window in the tests
SPECIALS = 4  # <unk> <pad> <bos> <eos> come first in the word tokenizer
EOS = 3


def task_sequences(n: int, seed: int, length: int = WINDOW) -> torch.Tensor:
    """``[n, length]`` token ids following the rule from a random start."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(n, length, dtype=torch.long)
    x[:, :2] = torch.randint(V, (n, 2), generator=g)
    for i in range(2, length):
        x[:, i] = perm[x[:, i - 2]]
    return x + SPECIALS


def write_texts(path: Path, n_paragraphs: int, seed: int) -> Path:
    rows = task_sequences(n_paragraphs, seed, length=10 * WINDOW - 1)
    paras = [" ".join(f"w{int(t) - SPECIALS}" for t in row) for row in rows]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def train_task_model(folder: Path, *, steps: int = 200, seed: int = 0) -> Path:
    """Train and save (model + word tokenizer + train.txt / heldout.txt next to it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgeon.data import save_word_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    try:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=V + SPECIALS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=2, eos_token_id=EOS, pad_token_id=1)
        model = LlamaForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for s in range(steps):
            ids = task_sequences(16, seed=1000 + s)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    save_word_tokenizer(folder, [f"w{i}" for i in range(V)])
    write_texts(folder.parent / "train.txt", 8, seed=7)
    write_texts(folder.parent / "heldout.txt", 4, seed=8)
    return folder


def heldout_loss(model_dir: Path | str, heldout: Path | str) -> float:
    """Mean next-token NLL of a saved model on the held-out text, windows = one sequence each."""
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(model_dir))
    return graph_loss(g, heldout)


def graph_loss(g, heldout: Path | str) -> float:
    from surgeon.context import Context
    from surgeon.metrics import perplexity

    ctx = Context()
    windows = ctx.tokens(str(heldout), g, seqlen=WINDOW)
    model = ctx.module(g)
    return float(perplexity(model, windows, batch_size=32)["nll"])


@pytest.fixture(scope="session", name="task_model")
def task_model_fixture(tmp_path_factory) -> Path:
    """A trained tiny Llama; ``task_model.parent`` holds train.txt and heldout.txt."""
    return train_task_model(tmp_path_factory.mktemp("task") / "model")
