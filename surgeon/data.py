"""Calibration and evaluation data: texts from files or from the model itself, packed into token windows.

Sources (``spec``):
- ``path.txt`` (or any other text file): paragraphs separated by blank lines;
- ``path.jsonl``: one JSON object per line, text under ``field`` (default ``text``); ``path.json``: a list of
  such objects or of strings;
- a folder written by ``datasets``' ``save_to_disk`` (needs the optional ``datasets`` package; a
  ``DatasetDict`` uses its ``train`` split, else its first);
- ``model`` / ``model:N``: N sequences sampled from the model itself (data-free calibration, as LLM-QAT,
  arXiv 2305.17888): the first token is drawn uniformly from the non-special vocabulary, the rest by sampling
  the model's next-token distribution (temperature 1, top-k 50) with a generator seeded by ``ctx.seed``.
  Within a run the samples come from the run's *input* model (``ctx.origin``), not from the graph a step
  receives: a retraining step after pruning learns from the dense model's text, not from the damaged model's.
  Sampling is the slow part of data-free calibration (one decoding step per token, for every row): samples are
  kept for the life of the process and on disk (``<cache>/samples/<key>.safetensors``, key = the model's
  fingerprint, N, length, seed and batch size), so the steps of a run and later runs on the same model share
  them; a progress line says how far it is. Pass a text file instead to skip sampling.

Token windows: every text is tokenised without special tokens, followed by EOS, all concatenated (with BOS once
in front when the tokenizer adds one), and cut into consecutive non-overlapping windows of ``seqlen`` tokens
(capped at 2048 and at the model's context); the tail shorter than a window is dropped. With ``max_windows``
fewer than available, a seeded subset is taken, kept in stream order. Same inputs and seed, same tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

    from surgeon.context import Context
    from surgeon.graph import Graph

MAX_SEQLEN = 2048
SAMPLE_TOP_K = 50
SAMPLE_BATCH = 32


# ---------------------------------------------------------------------------------------------------- files
def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SurgeonError(f"{path}:{line}: not UTF-8 text (byte {e.start}); expected plain text") from None


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _text_of(path: Path, line: int, obj: Any, field: str) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise SurgeonError(f"{path}:{line}: expected a JSON object with a {field!r} string")
    if field not in obj:
        keys = ", ".join(list(obj)[:6]) or "none"
        raise SurgeonError(f"{path}:{line}: no field {field!r} (keys: {keys}); choose one with --field")
    val = obj[field]
    if not isinstance(val, str):
        raise SurgeonError(f"{path}:{line}: field {field!r} is {type(val).__name__}, expected a string")
    return val


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line; a bad line raises naming path and line."""
    path = Path(path)
    if not path.is_file():
        raise SurgeonError(f"{path}: no such file")
    out = []
    for i, line in enumerate(_decode(path, path.read_bytes()).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise SurgeonError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
    return out


def _datasets_folder(path: Path, field: str) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise SurgeonError(f"{path}: a `datasets` folder needs the optional package datasets "
                           "(pip install datasets), or pass a .txt/.jsonl file") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; reported as one error
        raise SurgeonError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if field not in ds.column_names:
        raise SurgeonError(f"{path}: no column {field!r} (columns: {', '.join(ds.column_names)}); "
                           "choose one with --field")
    return [t for t in ds[field] if isinstance(t, str)]


def _file_texts(spec: str, field: str) -> list[str]:
    path = Path(spec).expanduser()
    if path.is_dir():
        texts = _datasets_folder(path, field)
    elif not path.is_file():
        raise SurgeonError(f"{spec}: no such file (expected a .txt or .jsonl file, a datasets folder, "
                           "or model:N for text sampled from the model)")
    elif path.suffix == ".jsonl":
        texts = [_text_of(path, i, obj, field) for i, obj in read_jsonl(path)]
    elif path.suffix == ".json":
        try:
            data = json.loads(_decode(path, path.read_bytes()))
        except json.JSONDecodeError as e:
            raise SurgeonError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise SurgeonError(f"{path}: expected a JSON list of strings or of objects with {field!r}")
        texts = [_text_of(path, 1, obj, field) for obj in data]
    else:
        texts = _paragraphs(_decode(path, path.read_bytes()))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SurgeonError(f"{path}: contains no text")
    return texts


def parse_model_spec(spec: str) -> int | None:
    """``model`` -> 0 (use the default count), ``model:N`` -> N, anything else -> None."""
    if spec == "model":
        return 0
    m = re.fullmatch(r"model:(\d+)", spec.strip())
    if m is None:
        if spec.startswith("model:"):
            raise SurgeonError(f"{spec}: expected model:N with N a positive number of sampled sequences")
        return None
    n = int(m.group(1))
    if n <= 0:
        raise SurgeonError(f"{spec}: N must be at least 1")
    return n


# -------------------------------------------------------------------------------------------- self-sampling
def top_k_draw(vocab_size: int, top_k: int, generator: torch.Generator):
    """A chooser for :meth:`surgeon.engine.Decoder.decode`: one draw per row from the softmax of the first
    ``vocab_size`` logits, restricted to the ``top_k`` largest (temperature 1), with ``generator``."""
    import torch

    def choose(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, :vocab_size].float().cpu()
        if 0 < top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)

    return choose


def sample_token_sequences(decoder, *, n: int, length: int, seed: int, vocab_size: int,
                           special_ids: set[int] | None = None, batch_size: int = SAMPLE_BATCH,
                           top_k: int = SAMPLE_TOP_K, progress: Any = None) -> torch.Tensor:
    """``[n, length]`` token ids sampled with a CPU generator seeded by ``seed`` on ``decoder`` (a
    :class:`surgeon.engine.Decoder`: block by block, KV cache).

    Rows are decoded ``batch_size`` at a time (one weight pass per step for the whole batch); per batch the
    first tokens are drawn uniformly from the non-special ids, then one top-k draw per row and step, so the
    generator's draws come in a fixed order. ``progress(iterable, total, description)`` wraps the decoding
    steps (``Context.progress``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in (special_ids or set())])
    n_steps = -(-n // batch_size) * (length - 1)
    ticks = iter(progress(range(n_steps), n_steps, f"sampling {n} × {length} tokens")
                 if progress is not None else range(n_steps))
    choose = top_k_draw(vocab_size, top_k, g)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        first = allowed[torch.randint(len(allowed), (b, 1), generator=g)]
        rest = decoder.decode(first, length - 1, choose, tick=lambda: next(ticks, None))
        out.append(torch.cat([first, rest], dim=1))
    next(ticks, None)  # let the progress finish
    return torch.cat(out, dim=0)


def _fingerprint(graph: Graph) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, value in graph.values(graph.names()):
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        sub = value.detach().reshape(-1)[::4099].cpu()
        h.update(torch.empty(sub.shape, dtype=sub.dtype).copy_(sub).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def sampler_fingerprint(graph: Graph | None, ctx: Context | None) -> str:
    """Identity of the model that ``model:N`` samples (``ctx.origin`` or ``graph``), for cache keys: sha256 of
    every tensor's name, shape, dtype and a strided subset (every 4099th value) of its contents."""
    if ctx is not None and ctx.origin is not None:
        if ctx.origin_fingerprint is None:
            ctx.origin_fingerprint = _fingerprint(ctx.origin)
        return ctx.origin_fingerprint
    return "none" if graph is None else _fingerprint(graph)


_SAMPLES: dict[tuple[str, int, int, int], Any] = {}  # (input model fingerprint, n, length, seed) -> ids


def samples_cache_path(fingerprint: str, n: int, length: int, seed: int) -> Path:
    from surgeon.checkpoint import cache_dir

    key = f"{fingerprint}-n{n}-len{length}-seed{seed}-b{SAMPLE_BATCH}-k{SAMPLE_TOP_K}"
    return cache_dir() / "samples" / f"{key}.safetensors"


def _read_samples(path: Path, n: int, length: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path))["ids"].long()
    except Exception:  # noqa: BLE001 - a damaged cache entry is resampled, not trusted
        return None
    return ids if tuple(ids.shape) == (n, length) else None


def _write_samples(path: Path, ids: torch.Tensor) -> None:
    import os
    import tempfile

    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"ids": ids.int().contiguous()}, tmp, metadata={"format": "pt"})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only cache only costs the next run the sampling time


def _sampled(graph: Graph | None, ctx: Context | None, n: int, length: int) -> tuple[torch.Tensor, Any]:
    source = ctx.origin if ctx is not None and ctx.origin is not None else graph
    if source is None:
        raise SurgeonError("model:N data needs a model to sample from")
    from surgeon.model import load_tokenizer

    seed = ctx.seed if ctx is not None else 0
    try:
        tok = ctx.tokenizer(source) if ctx is not None else load_tokenizer(source)
    except SurgeonError:
        tok = None
    fingerprint = sampler_fingerprint(source, ctx)
    key = (fingerprint, n, length, seed)
    if key in _SAMPLES:
        return _SAMPLES[key], tok
    disk = samples_cache_path(fingerprint, n, length, seed)
    ids = _read_samples(disk, n, length)
    if ids is not None:
        if ctx is not None:
            ctx.log(f"model:{n}: {n} × {length} tokens sampled from the model earlier (cache {disk})")
        _SAMPLES[key] = ids
        return ids, tok
    if ctx is not None:
        which = "the run's input model" if source is not graph else "the model"
        ctx.log(f"model:{n}: sampling {n} × {length} tokens from {which} (cached for later runs; "
                "pass a .txt/.jsonl file to use your own text instead)")
    from surgeon import engine

    eng = engine.from_context(source, ctx) if ctx is not None else engine.Engine(source)
    with engine.Decoder(eng, log=ctx.log if ctx is not None else None) as decoder:
        vocab = decoder.vocab
        if tok is not None:
            vocab = min(vocab, len(tok))  # never sample ids the tokenizer cannot decode (padded embedding rows)
        specials = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
        ids = sample_token_sequences(decoder, n=n, length=length, seed=seed, vocab_size=vocab,
                                     special_ids=specials, progress=ctx.progress if ctx is not None else None)
    del eng
    _SAMPLES[key] = ids
    _write_samples(disk, ids)
    return ids, tok


# -------------------------------------------------------------------------------------------------- public
def load_texts(spec: str, *, graph: Graph | None = None, ctx: Context | None = None, n_samples: int = 64,
               field: str = "text", sample_len: int = 128) -> list[str]:
    """Texts from ``spec`` (see the module docstring). ``n_samples``/``sample_len`` apply to ``model``."""
    n = parse_model_spec(spec)
    if n is None:
        return _file_texts(spec, field)
    ids, tok = _sampled(graph, ctx, n or n_samples, sample_len)
    if tok is None:
        raise SurgeonError("model:N texts need the model's tokenizer to decode the samples")
    return [tok.decode(row.tolist(), skip_special_tokens=True) for row in ids]


def max_context(config: dict[str, Any]) -> int | None:
    """The model's context length from its config, if it states one."""
    for src in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
            if isinstance(src.get(key), int) and src[key] > 0:
                return int(src[key])
    return None


def effective_seqlen(seqlen: int, config: dict[str, Any]) -> int:
    if seqlen < 2:
        raise SurgeonError(f"seqlen {seqlen}: expected at least 2 tokens per window")
    ctx_len = max_context(config)
    return min(seqlen, MAX_SEQLEN, ctx_len or MAX_SEQLEN)


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS in front by default (checked by encoding, not by its flags)."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = tok("x")["input_ids"][:1]
    return with_specials == [bos] and tok("x", add_special_tokens=False)["input_ids"][:1] != [bos]


def token_windows(spec: str, graph: Graph, *, ctx: Context | None = None, seqlen: int = 512,
                  max_windows: int | None = None, field: str = "text", n_samples: int = 64) -> torch.Tensor:
    """``LongTensor [n, seqlen']`` of consecutive non-overlapping windows (see the module docstring).

    ``seqlen' = min(seqlen, 2048, model context)``; a stream shorter than one window gives a single window of
    the whole stream. For ``model[:N]`` each window is one sampled sequence of ``seqlen'`` tokens.
    """
    import torch

    if max_windows is not None and max_windows < 1:
        raise SurgeonError(f"max_windows {max_windows}: expected at least 1")
    length = effective_seqlen(seqlen, graph.config)
    n = parse_model_spec(spec)
    if n is not None:
        count = n or (max_windows or n_samples)
        if max_windows is not None:
            count = min(count, max_windows)
        ids, _ = _sampled(graph, ctx, count, length)
        return ids.long()
    texts = _file_texts(spec, field)
    from surgeon.model import load_tokenizer

    tok = ctx.tokenizer(graph) if ctx is not None else load_tokenizer(graph)
    stream: list[int] = []
    if _adds_bos(tok):
        stream.append(int(tok.bos_token_id))
    eos = tok.eos_token_id
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
    if len(stream) < 2:
        raise SurgeonError(f"{spec}: fewer than 2 tokens of text")
    total = len(stream) // length
    if total == 0:
        if ctx is not None:
            ctx.log(f"{spec}: {len(stream)} tokens, fewer than seqlen {length}: one window of {len(stream)}")
        return torch.tensor([stream], dtype=torch.long)
    windows = torch.tensor(stream[: total * length], dtype=torch.long).view(total, length)
    if max_windows is not None and total > max_windows:
        g = torch.Generator().manual_seed(ctx.seed if ctx is not None else 0)
        keep = torch.randperm(total, generator=g)[:max_windows].sort().values
        windows = windows[keep]
    return windows


def save_word_tokenizer(folder: str | Path, words: list[str], *, specials: tuple[str, ...] = (
        "<unk>", "<pad>", "<bos>", "<eos>"), add_bos: bool = False) -> Path:
    """Save a whitespace word-level tokenizer (``tokenizer.json`` + config) for toy models and tests.

    Ids: the specials (unk, pad, bos, eos) first, then ``words`` in first-seen order. Decoding joins words with
    spaces. ``add_bos`` makes encoding put BOS in front, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*specials, *words]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{specials[2]} $A",
                                                            special_tokens=[(specials[2], vocab[specials[2]])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=specials[0], pad_token=specials[1],
                                  bos_token=specials[2], eos_token=specials[3])
    folder = Path(folder)
    tok.save_pretrained(folder)
    return folder
