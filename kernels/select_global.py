"""Exact k-th smallest |w| over a stream of tensors (global magnitude pruning), holding little memory.

Main path, :class:`BracketKth` (three streaming reads, the first only a sample): draw a sample of every tensor's
keys (:func:`sample_tensor`), take a bracket around the k-th key from the pooled sample
(:func:`surgeon.kernels.select.bracket`), then one branch-free pass per tensor counts the entries below the
bracket and keeps the keys inside it; the exact k-th key is selected among the kept keys. If the count shows the
bracket missed (probability ~1e-6 per run at z = 5), :class:`StreamingKth` gives the exact answer from two
histogram passes. Reference for tests: ``torch.kthvalue`` of the concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .select import (
    N_BINS,
    NonFiniteInput,
    _check_finite,
    _locate,
    choose_in_bracket,
    fp32_bits,
    high_histogram,
    keys_of,
    low_histogram,
    split_bracket,
)
from .select_band import sample_keys, split_band


def sample_tensor(x: torch.Tensor, size: int, *, absolute: bool = True, seed: int = 0) -> np.ndarray:
    """Keys of ``size`` entries of ``x`` drawn uniformly (fixed seed); only the drawn entries are converted. Keys
    of |x| on CPU fp32/bfloat16 storage: one draw per stratum, gathered in C (:func:`select_band.sample_keys`)."""
    raw = _storage(x) if absolute else None
    keys = sample_keys(*raw, max(1, size), seed) if raw is not None else None
    if keys is not None:
        return keys
    at = torch.from_numpy(np.random.default_rng(seed).integers(0, x.numel(), max(1, size)))
    return keys_of(fp32_bits(x.detach().reshape(-1)[at]), absolute)


def _storage(x: torch.Tensor) -> tuple[np.ndarray, str] | None:
    """A contiguous CPU fp32/bfloat16 tensor's storage as numpy bits, without a copy; None for others."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if x.dtype == torch.float32:
        return x.reshape(-1).numpy(), "float32"
    return x.reshape(-1).view(torch.int16).numpy().view(np.uint16), "bfloat16"


@dataclass
class BracketKth:
    """Pass over tensors for a bracket ``[lo, hi]`` of keys: entries below it are counted, keys inside it kept
    (per tensor, in stream order); :meth:`result` selects the exact k-th key among them, or says the bracket
    missed."""

    k: int
    lo: int
    hi: int
    absolute: bool = True
    below: int = 0
    inside: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, x: torch.Tensor, index: int) -> None:
        """Count/keep ``x``'s entries; :class:`NonFiniteInput` (and nothing added) when ``x`` holds NaN/Inf.
        A CPU fp32/bfloat16 tensor of |x| goes through the C pass on its own storage (no fp32 copy)."""
        raw = _storage(x) if self.absolute else None
        got = split_band(*raw, self.lo, self.hi) if raw is not None else None
        if got is None:
            self.add_bits(fp32_bits(x), index)
        else:
            self._add_split(got, index)

    def add_bits(self, bits: np.ndarray, index: int) -> None:
        """:meth:`add` on flat fp32 bit patterns (uint32, numpy)."""
        self._add_split(split_bracket(bits, self.lo, self.hi, self.absolute), index)

    def _add_split(self, split: tuple[np.ndarray, int, int], index: int) -> None:
        keys, below, bad = split
        if bad:
            raise NonFiniteInput("selection over a tensor with NaN or Inf values")
        self.below += below
        self.inside[index] = keys

    def merged(self, other: BracketKth) -> BracketKth:
        """The pass over two runs of tensors (same bracket), combined."""
        self.below += other.below
        self.inside.update(other.inside)
        return self

    def result(self, n_tensors: int) -> tuple[int, int, list[int]] | None:
        """(threshold key, entries strictly below it, entries equal to it per tensor in stream order), or None
        when the k-th key is not inside the bracket."""
        need = self.k - self.below
        kept = [self.inside.get(i, np.zeros(0, np.uint32)) for i in range(n_tensors)]
        total = sum(a.size for a in kept)
        if not 1 <= need <= total:
            return None
        t, n_less = choose_in_bracket(np.concatenate(kept), need)
        return t, self.below + n_less, [int(np.count_nonzero(a == t)) for a in kept]



@dataclass
class StreamingKth:
    """Exact k-th smallest over a stream of tensors in two passes, holding only histograms.

    Pass 1: :meth:`add_high` each tensor, then :meth:`bucket` gives the high-16-bit bucket of the k-th key.
    Pass 2: :meth:`add_low` each tensor with its stream index, then :meth:`result` gives the threshold key, the
    count strictly below it, and per tensor how many of its entries equal it (for each tensor only the non-zero
    bins of its boundary-bucket histogram are kept: at most 65,536 each, usually a handful).
    """

    k: int
    absolute: bool = True
    high: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))
    n_seen: int = 0
    _bucket: int | None = None
    _below_hi: int = 0
    low_by_tensor: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add_high(self, x: torch.Tensor) -> None:
        """Add ``x``'s pass-1 histogram; :class:`NonFiniteInput` (and nothing added) when ``x`` holds NaN/Inf."""
        hist = high_histogram(x, absolute=self.absolute)
        _check_finite(hist)
        self.high += hist
        self.n_seen += x.numel()

    def bucket(self) -> int:
        if self._bucket is None:
            _check_finite(self.high)
            if not 1 <= self.k <= self.n_seen:
                raise ValueError(f"k={self.k} outside [1, {self.n_seen}]")
            self._bucket, self._below_hi = _locate(self.high, self.k)
        return self._bucket

    def merged_high(self, other: StreamingKth) -> StreamingKth:
        """Pass 1 over two runs of tensors, combined: the histograms add up (into a new array: a partial result
        that crossed a process boundary may be read-only)."""
        self.high = self.high + other.high
        self.n_seen += other.n_seen
        return self

    def merged_low(self, other: StreamingKth) -> StreamingKth:
        """Pass 2 over two runs of tensors (both started from the same pass-1 histogram), combined."""
        self.low_by_tensor.update(other.low_by_tensor)
        return self

    def add_low(self, x: torch.Tensor, index: int) -> None:
        hist = low_histogram(x, self.bucket(), absolute=self.absolute)
        nz = np.flatnonzero(hist)
        self.low_by_tensor[index] = (nz.astype(np.int64), hist[nz])

    def result(self, n_tensors: int) -> tuple[int, int, list[int]]:
        """(threshold key, entries strictly below it, entries equal to it per tensor in stream order)."""
        b = self.bucket()
        total = np.zeros(N_BINS, dtype=np.int64)
        for nz, cnt in self.low_by_tensor.values():
            total[nz] += cnt
        lo, below_lo = _locate(total, self.k - self._below_hi)
        equal = []
        for i in range(n_tensors):
            nz, cnt = self.low_by_tensor.get(i, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
            hit = np.flatnonzero(nz == lo)
            equal.append(int(cnt[hit[0]]) if hit.size else 0)
        return (b << 16) | lo, self._below_hi + below_lo, equal
