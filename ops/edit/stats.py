"""Key second moment C = E[kkᵀ] at the edited down-projection (ALGORITHMS.md §4.4), cached on disk.

C is uncentred, over every non-pad token of packed windows of ``stats_data`` (a text file, .jsonl, a datasets
folder, or ``model[:N]`` = text sampled from the model itself), accumulated in fp64 with
:class:`surgeon.kernels.linalg.CovarianceAccumulator`; the forward pass stops at the edited layer. The default
token count is 10·d_k for text files and 2·d_k for text sampled from the model (FastMEMIT, arXiv 2506.04226,
finds 2–10·d_k enough; sampling costs one decoding step per token, so the data-free default takes the low end:
SmolLM2-135M, 3,072 sampled tokens instead of 15,360).

Cache: ``ctx.cache("stats", key)`` (``<cache_dir>/stats/<key>.safetensors``) with ``mom2`` (C, fp64) and ``count``; the key is the sha256 of
the edited layer's MLP weights (down, and the up/gate tensors that make the keys), the layer, the data
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
from surgeon.kernels.linalg import CovarianceAccumulator

from .forward import StopForward
from .site import EditSite

STATS_VERSION = "2"
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


def weights_fingerprint(mlp: torch.nn.Module, site: EditSite) -> str:
    """sha256 over the edited layer's MLP parameters (the keys come from up/gate, the edit lands in down)."""
    h = hashlib.sha256()
    for pname, p in sorted(mlp.named_parameters()):
        h.update(f"{pname}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
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


def accumulate_key_moment(model: torch.nn.Module, module: torch.nn.Module, windows: torch.Tensor, *,
                          n_tokens: int, device: str, batch_tokens: int = 8192,
                          pad_id: int | None = None, progress: Any = None) -> tuple[torch.Tensor, int]:
    """E[kkᵀ] (fp64, CPU) of ``module``'s inputs over ``windows`` [n, T], stopping after ``n_tokens``."""
    acc: CovarianceAccumulator | None = None
    per = max(1, batch_tokens // max(windows.shape[1], 1))
    batches = [windows[i:i + per] for i in range(0, windows.shape[0], per)]
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for ids in (progress(batches) if progress else batches):
            mask = torch.ones_like(ids) if pad_id is None else (ids != pad_id).long()
            got.clear()
            try:
                with torch.no_grad():
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except StopForward:
                pass
            x = got[0]
            x = x[mask.to(x.device).bool()]
            if acc is None:
                acc = CovarianceAccumulator(x.shape[-1], device=device, dtype=torch.float64)
            room = n_tokens - acc.count
            acc.update(x[:room])
            if acc.count >= n_tokens:
                break
    finally:
        handle.remove()
    if acc is None or acc.count == 0:
        raise SurgeonError("covariance statistics: the data gave no tokens")
    return acc.mean().double(), acc.count


def key_statistics(model: torch.nn.Module, graph: Any, ctx: Any, site: EditSite, module: torch.nn.Module,
                   mlp: torch.nn.Module, *, spec: str, n_tokens: int, seqlen: int,
                   use_cache: bool = True) -> KeyStats:
    """C for ``site`` from ``spec``: from the cache (``ctx.cache("stats", key)``) when present, else computed and
    cached."""
    if spec.endswith(".npz"):
        return npz_stats(ctx.read(spec, what="--stats-data"), str(Path(spec).expanduser()), site.d_k)
    from surgeon.data import effective_seqlen, parse_model_spec, sampler_fingerprint

    seqlen = effective_seqlen(seqlen, graph.config)
    sampler = sampler_fingerprint(graph, ctx) if parse_model_spec(spec) is not None else ""
    key = cache_key(weights_fingerprint(mlp, site), data_fingerprint(spec, ctx.seed, ctx, sampler), n_tokens,
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
    mom2, count = accumulate_key_moment(model, module, windows, n_tokens=n_tokens, device=ctx.device,
                                        progress=lambda b: ctx.progress(b, description="key statistics"))
    stats = KeyStats(mom2, count, "computed", key, entry.path)
    if use_cache:
        entry.save({"mom2": mom2.contiguous(), "count": torch.tensor([count], dtype=torch.int64)},
                   {"module": site.name, "layer": str(site.layer), "n_tokens": str(count),
                    "seqlen": str(seqlen), "data": spec[:200], "version": STATS_VERSION})
    return stats
