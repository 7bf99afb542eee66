"""The pieces the task-vector merges share (ALGORITHMS.md §3.1-3.2): TIES's magnitude trim, sign election and
disjoint mean, DARE's seeded random drop with its rescales, and the range check of densities.

Used by :mod:`surgeon.ops.merge.classic` (task arithmetic, TIES, DARE) and :mod:`surgeon.ops.merge.gta`
(Breadcrumbs, DELLA, SCE). fp32 tensors in and out; no graph or file here.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


def trim_mask(delta: torch.Tensor, density: float, *, overwrite: bool = False) -> torch.Tensor:
    """Boolean mask of exactly ``k = int(density·numel)`` largest |δ| (TIES "trim").

    The k-th largest |δ| comes from the O(n) radix selection of :mod:`surgeon.kernels.select` (no sort, no index
    tensor). Entries tied at a non-zero threshold are chosen as ``torch.argsort(|δ|, descending=True)[:k]``
    chooses them (mergekit's call). Its order among equal values is that of an unstable introsort over the whole
    tensor (measured: neither index order nor its reverse), so only the same sort reproduces it: on the CPU the
    C port of that introsort in :mod:`surgeon.kernels.tie_order` runs only the partitions holding the boundary
    (O(n), 0.3 s instead of 1.6 s for 28 M entries), elsewhere torch's sort runs in place; both only when the k-th
    value is tied. Ties at zero (a tensor a fine-tune left unchanged) are taken in
    flat order without sorting, since zeros add nothing. ``overwrite``: ``delta`` is the caller's temporary and
    may be overwritten (with |δ|, then sorted), saving two tensor-sized buffers."""
    import torch
    from surgeon.kernels import tie_order
    from surgeon.kernels.select import kth_smallest

    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool)
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    kth = kth_smallest(delta, n - k + 1, absolute=True)
    a = delta.detach().reshape(-1).abs_() if overwrite else delta.detach().reshape(-1).abs()
    mask = a > kth.value
    need = k - (n - kth.n_less - kth.n_equal)  # how many entries equal to the threshold to keep
    if need == kth.n_equal:
        mask |= a == kth.value
    elif need > 0 and kth.value == 0.0:
        zeros = a == 0
        mask |= zeros & (zeros.cumsum(0) <= need)
    elif need > 0 and a.device.type == "cpu" and a.dtype == torch.float32 and tie_order.available(n):
        del mask  # the sort's set of first k, from only the partitions that hold the boundary (a permuted)
        mask = torch.from_numpy(tie_order.sort_top_k_mask(a.contiguous().numpy(), k, kth=kth.value))
    elif need > 0:
        del mask
        order = torch.empty(n, dtype=torch.int64)
        torch.sort(a, descending=True, out=(a, order))  # = torch.argsort(a, descending=True), a sorted in place
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:k]] = True
    return mask.reshape(delta.shape)


def sign_election(weighted: torch.Tensor, *, method: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """γ = sign of Σ_i (weighted τ̂_i) per element (+1 on ties), or of the count of signs Σ_i sign(w_i τ̂_i)."""
    import torch

    s = weighted.sum(0) if method == "sum" else torch.sign(weighted).sum(0)
    return torch.where(s >= 0, 1.0, -1.0)


Election = Literal["weighted", "unweighted", "count"]


def disjoint_mean(deltas: torch.Tensor, weights: Sequence[float], *, normalize: bool = True,
                  election: Election = "weighted") -> torch.Tensor:
    """TIES disjoint merge of trimmed task vectors ``deltas`` [n, ...]: Σ_agree w τ̂ / Σ_agree w (0 if none).

    ``election``: sign of Σ w_i τ̂_i (weighted: mergekit's ``sum``), of Σ τ̂_i (unweighted: the paper's Eq. 2), or
    the majority of the signs of w_i τ̂_i (count: mergekit's ``consensus_method: count``; zeros do not vote).
    """
    import torch

    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if election == "count":
        gamma = sign_election(weighted, method="count")
    else:
        gamma = sign_election(weighted if election == "weighted" else deltas)
    agree = torch.sign(weighted) == gamma
    mixed = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1.0
        mixed = mixed / divisor
    return mixed


def chunked_disjoint_mean(deltas: torch.Tensor, weights: Sequence[float], *, normalize: bool,
                          election: Election = "weighted", chunk: int = 1 << 22) -> torch.Tensor:
    """:func:`disjoint_mean` over ``chunk`` entries at a time (the same numbers; temporaries stay small)."""
    import torch

    flat = deltas.reshape(deltas.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32)
    for start in range(0, flat.shape[1], chunk):
        sl = slice(start, min(start + chunk, flat.shape[1]))
        out[sl] = disjoint_mean(flat[:, sl], weights, normalize=normalize, election=election)
    return out.reshape(deltas.shape[1:])


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit RNG seed from (global seed, tensor name): the same tensor gets the same mask in any order."""
    h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def l1_rescale(kept: torch.Tensor, full: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled so that its L1 norm equals ``full``'s (mergekit's ``rescale`` for DARE/DELLA); unchanged
    when either norm is below ``eps``."""
    before, after = float(full.abs().sum()), float(kept.abs().sum())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True,
              rescale_norm: Literal["probability", "l1"] = "probability") -> torch.Tensor:
    """τ ⊙ m, m ~ Bernoulli(p = density), rescaled by 1/p (the paper's Eq. 3) or to τ's L1 norm (mergekit)."""
    import torch

    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    out = delta * keep
    if not rescale:
        return out
    if rescale_norm == "l1":
        return l1_rescale(out, delta)
    return out / density if density > 0 else out


def check_unit_interval(v: Any, what: str, *, low_open: bool = False) -> None:
    """Every number in ``v`` (a float, a per-layer list or a per-pattern mapping) lies in [0, 1] (or (0, 1])."""
    vals: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        else:
            vals.append(float(x))

    walk(v)
    for x in vals:
        if not (0.0 < x <= 1.0 if low_open else 0.0 <= x <= 1.0):
            raise ValueError(f"{what} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {x}")
