"""Key second moment C = E[kkᵀ] at the edited down-projection (ALGORITHMS.md §4.4), cached on disk.

C is uncentred, over every non-pad token of packed windows of ``stats_data`` (a text file, .jsonl, a datasets
folder, or ``model[:N]`` = text sampled from the model itself), accumulated in fp64 on the model engine (:mod:`surgeon.engine`: block by block, the
edited block observed with ``("xtx", "count")``, later blocks not run; memory one block + the windows' hidden
states). The default
token count is 10·d_k for text files and 2·d_k for text sampled from the model (FastMEMIT, arXiv 2506.04226,
finds 2–10·d_k enough; sampling costs one decoding step per token, so the data-free default takes the low end:
SmolLM2-135M, 3,072 sampled tokens instead of 15,360).

Cache: ``ctx.cache("stats", key)`` (``<cache_dir>/stats/<key>.safetensors``) with ``mom2`` (C, fp64) and ``count``; the key is the sha256 of
the edited layer's MLP tensors as the graph holds them (down, and the up/gate tensors that make the keys), the layer, the data
(file bytes, or the sampling spec and seed), the token count and the window length. ROME/MEMIT ``.npz`` caches
(``mom2.mom2`` = Σkkᵀ, ``mom2.count``) are read when ``stats_data`` names one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import SurgeonError

from .site import EditSite

STATS_VERSION = "3"  # 3: weights fingerprint from the graph's tensors (names relative to the MLP)
TOKENS_PER_DK_FILE = 10
TOKENS_PER_DK_SAMPLED = 2


def default_stats_tokens(d_k: int, spec: str) -> int:
    """Default token count for C: 10·d_k from text, 2·d_k from ``model[:N]`` samples (see the module doc)."""
    from surgeon.data import parse_model_spec

    sampled = parse_model_spec(spec) is not None
    return (TOKENS_PER_DK_SAMPLED if sampled else TOKENS_PER_DK_FILE) * d_k


@dataclass
class KeyStats:
    mom2: torch.Tensor  # C, [d_k, d_k] fp64
    count: int
    source: str  # "cache", "computed", "npz", "identity"
    key: str = ""
    path: Path | None = None


def data_fingerprint(spec: str, seed: int, ctx: Any, sampler: str = "") -> str:
    """What the statistics were computed from: file content, or the self-sampling spec, seed and the
    fingerprint of the sampled model (:func:`surgeon.data.sampler_fingerprint`)."""
    content = ctx.fingerprint(spec, what="--stats-data")
    if content is not None:
        return "file:" + content
    return f"spec:{spec}:seed={seed}:sampler={sampler}"


def mlp_tensor_names(graph: Any, site: EditSite) -> list[str]:
    """Graph names of the edited layer's MLP tensors (down, and the up/gate tensors that make the keys)."""
    mlp = site.module_path.rsplit(".", 1)[0] + "."
    return sorted(n for n in graph.names() if n.startswith(mlp))


def weights_fingerprint(graph: Any, site: EditSite) -> str:
    """sha256 over the edited layer's MLP tensors as the graph holds them (lazy nodes are read one at a time)."""
    h = hashlib.sha256()
    for name, t in graph.values(mlp_tensor_names(graph, site)):
        leaf = name[len(site.module_path.rsplit(".", 1)[0]) + 1:]
        h.update(f"{leaf}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(f"layer={site.layer}:{site.name}".encode())
    return h.hexdigest()


def cache_key(weights: str, data: str, n_tokens: int, seqlen: int) -> str:
    blob = json.dumps({"v": STATS_VERSION, "w": weights, "d": data, "n": n_tokens, "len": seqlen}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def npz_stats(data: bytes, where: str, d_k: int) -> KeyStats:
    """C from a ROME/MEMIT ``.npz`` stats file's bytes (``mom2.mom2`` = Σkkᵀ, ``mom2.count``)."""
    import io

    import numpy as np

    try:
        z = np.load(io.BytesIO(data))
        total, count = z["mom2.mom2"], int(z["mom2.count"])
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds on a foreign file; name it
        raise SurgeonError(f"{where}: not a ROME/MEMIT stats file (needs mom2.mom2 and mom2.count: "
                           f"{e.__class__.__name__})") from None
    if total.shape != (d_k, d_k) or count <= 0:
        raise SurgeonError(f"{where}: mom2 has shape {list(total.shape)} and count {count}; "
                           f"expected [{d_k}, {d_k}] and a positive count")
    return KeyStats(torch.from_numpy(total).double() / count, count, "npz", path=Path(where))


def cached_stats(entry: Any, d_k: int) -> KeyStats | None:
    """The cache entry's C, or None on a miss, a damaged entry or another shape."""
    t = entry.load()
    if t is None or "mom2" not in t or "count" not in t or tuple(t["mom2"].shape) != (d_k, d_k):
        return None
    return KeyStats(t["mom2"].double(), int(t["count"].item()), "cache", path=entry.path)


def accumulate_key_moment(graph: Any, ctx: Any, site: EditSite, windows: torch.Tensor, *, n_tokens: int,
                          micro_batch: int = 2) -> tuple[torch.Tensor, int]:
    """E[kkᵀ] (fp64, CPU) of the edited down-projection's inputs over the first ``n_tokens`` tokens of
    ``windows`` [n, T], on the model engine: the blocks before the edited layer run unchanged, the edited block is
    observed, later blocks are not run. Two windows per micro-batch: the MLP's [tokens, d_ff] activations of
    eight were ~0.5 GB at d_ff 14336, next to C itself (1.6 GB in fp64)."""
    from surgeon import engine

    per = max(windows.shape[1], 1)
    n_windows = min(windows.shape[0], -(-n_tokens // per))
    samples = [windows[i] for i in range(n_windows)]
    if samples and n_windows * per > n_tokens:  # the first n_tokens tokens: the last window is cut (causal)
        samples[-1] = samples[-1][: n_tokens - (n_windows - 1) * per]
    if not samples:
        raise SurgeonError("covariance statistics: the data gave no tokens")
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=micro_batch)
    got: dict[str, Any] = {}
    trans = {site.name} if site.transposed else frozenset()
    for block in eng.blocks(samples, layers=[site.layer], record=False, progress=getattr(ctx, "progress", None)):
        got.update(block.observe({site.name: ("xtx", "count")}, transposed=trans))
    st = got[site.name]
    if st.count == 0:
        raise SurgeonError("covariance statistics: the data gave no tokens")
    return st.xtx.double().cpu().div_(st.count), int(st.count)  # in place: C is 1.6 GB in fp64 at d_k 14336


def key_statistics(graph: Any, ctx: Any, site: EditSite, *, spec: str, n_tokens: int, seqlen: int,
                   use_cache: bool = True) -> KeyStats:
    """C for ``site`` from ``spec``: from the cache (``ctx.cache("stats", key)``) when present, else computed and
    cached."""
    if spec.endswith(".npz"):
        return npz_stats(ctx.read(spec, what="--stats-data"), str(Path(spec).expanduser()), site.d_k)
    from surgeon.data import effective_seqlen, parse_model_spec, sampler_fingerprint

    seqlen = effective_seqlen(seqlen, graph.config)
    sampler = sampler_fingerprint(graph, ctx) if parse_model_spec(spec) is not None else ""
    key = cache_key(weights_fingerprint(graph, site), data_fingerprint(spec, ctx.seed, ctx, sampler), n_tokens,
                    seqlen)
    entry = ctx.cache("stats", key)
    if use_cache:
        hit = cached_stats(entry, site.d_k)
        if hit is not None:
            hit.key = key
            ctx.log(f"covariance statistics: cached ({hit.count} tokens, {entry.path})")
            return hit
    n_windows = -(-n_tokens // seqlen)
    windows = ctx.tokens(spec, graph, seqlen=seqlen, max_windows=n_windows, n_samples=n_windows)
    if windows.numel() < n_tokens:
        ctx.log(f"[yellow]covariance statistics: {spec} gives {windows.numel()} tokens, fewer than the "
                f"{n_tokens} asked; C may be rank-deficient and gets εI[/]")
    mom2, count = accumulate_key_moment(graph, ctx, site, windows, n_tokens=n_tokens)
    stats = KeyStats(mom2, count, "computed", key, entry.path)
    if use_cache:
        entry.save({"mom2": mom2.contiguous(), "count": torch.tensor([count], dtype=torch.int64)},
                   {"module": site.name, "layer": str(site.layer), "n_tokens": str(count),
                    "seqlen": str(seqlen), "data": spec[:200], "version": STATS_VERSION})
    return stats
