"""Exact k-th value selection and "exactly k smallest" masks.

CPU: a two-pass radix select in numba on the fp32 bit pattern. Floats map to uint32 keys whose unsigned order is
the float order (flip all bits of negatives, set the sign bit of non-negatives), so pass 1 histograms the high 16
bits (65,536 bins, one histogram per thread), finds the bucket holding the k-th key, and pass 2 histograms the low
16 bits of the keys in that bucket. Both passes are O(n), parallel and read the data once each; the result is
exact and also yields how many keys lie below and at the k-th value (needed to break ties).

CUDA: ``torch.kthvalue`` on the device (plus two comparisons for the counts).

The same two histogram passes, fed tensor by tensor, give an exact *global* threshold over many tensors while
holding only the histograms (:class:`StreamingKth`); ``ops/prune/magnitude.py`` runs them inside graph ``Reduce``
nodes. Reference for tests: ``torch.kthvalue``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

try:  # numba is a hard dependency, but keep import errors readable
    from numba import get_num_threads, njit, prange
except ImportError:  # pragma: no cover
    njit = None

N_BINS = 1 << 16
_CHUNK = 1 << 18  # elements per parallel histogram task


@dataclass(frozen=True)
class Kth:
    """The k-th smallest value (1-based ``k``) and how many entries lie strictly below / equal to it."""

    value: float
    key: int  # monotone uint32 key of ``value`` (fp32 bit pattern, order-preserving)
    n_less: int
    n_equal: int


# ---------------------------------------------------------------------------------------------------------------
# key transform (fp32 bits -> order-preserving uint32)

def fp32_bits(x: torch.Tensor) -> np.ndarray:
    """Flat uint32 view of ``x`` as fp32 (a copy only when ``x`` is not already contiguous fp32 on the CPU;
    fp16/bf16 -> fp32 is exact)."""
    if x.dtype == torch.float64:
        raise TypeError("fp32_bits: float64 is not supported (keys are 32-bit); use torch.kthvalue")
    x32 = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
    return x32.numpy().view(np.uint32)


def _transform_np(bits: np.ndarray) -> np.ndarray:
    neg = (bits >> np.uint32(31)).astype(bool)
    return np.where(neg, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def key_to_float(key: int) -> float:
    key = int(key) & 0xFFFFFFFF
    bits = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


if njit is not None:

    @njit(cache=True, inline="always")
    def _key(b, absolute):  # pragma: no cover - compiled
        if absolute:
            return (b & np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000)
        if b >> np.uint32(31):
            return ~b
        return b | np.uint32(0x80000000)

    @njit(cache=True, parallel=True)
    def _transform(bits):  # pragma: no cover - compiled
        out = np.empty_like(bits)
        for i in prange(bits.size):
            out[i] = _key(bits[i], False)
        return out

    @njit(cache=True, parallel=True)
    def _hist(bits, absolute, bucket, hist, parts):  # pragma: no cover - compiled
        """bucket < 0: ``hist[b] += #{keys with high 16 bits == b}``; else the refine pass
        ``hist[l] += #{keys == bucket·2¹⁶ + l}``. One private histogram per part (thread), then summed."""
        n = bits.size
        step = (n + parts - 1) // parts
        local = np.zeros((parts, N_BINS), dtype=np.int64)
        ub = np.uint32(max(bucket, 0))
        for p in prange(parts):
            lo = p * step
            hi = min(n, lo + step)
            if bucket < 0:
                for i in range(lo, hi):
                    local[p, _key(bits[i], absolute) >> np.uint32(16)] += 1
            else:
                for i in range(lo, hi):
                    k = _key(bits[i], absolute)
                    if (k >> np.uint32(16)) == ub:
                        local[p, k & np.uint32(0xFFFF)] += 1
        for p in range(parts):
            for b in range(N_BINS):
                hist[b] += local[p, b]

    @njit(cache=True, parallel=True)
    def _mask_below(bits, absolute, t_key, n_ties, out):  # pragma: no cover - compiled
        """``out[i] = key[i] < t_key``, or ``key[i] == t_key`` among the first ``n_ties`` such entries."""
        n = bits.size
        t = np.uint32(t_key)
        for i in prange(n):
            out[i] = _key(bits[i], absolute) < t
        if n_ties > 0:
            seen = 0
            for i in range(n):
                if _key(bits[i], absolute) == t:
                    out[i] = True
                    seen += 1
                    if seen == n_ties:
                        break

    @njit(cache=True, parallel=True)
    def _hist_parts(bits, absolute, parts):  # pragma: no cover - compiled
        """Pass 1 of the fused pruning kernel: per-part high-16-bit histograms ``[parts, N_BINS]``."""
        n = bits.size
        step = (n + parts - 1) // parts
        local = np.zeros((parts, N_BINS), dtype=np.int64)
        for p in prange(parts):
            for i in range(p * step, min(n, (p + 1) * step)):
                local[p, _key(bits[i], absolute) >> np.uint32(16)] += 1
        return local

    @njit(cache=True, parallel=True)
    def _zero_split(bits, absolute, bucket, offsets, out, idx, parts):  # pragma: no cover - compiled
        """Pass 2: zero every entry whose high bits are below ``bucket``, copy the rest, and list (in flat order)
        the indices of the entries inside ``bucket`` (each part writes from its own offset)."""
        n = bits.size
        step = (n + parts - 1) // parts
        ub = np.uint32(bucket)
        for p in prange(parts):
            c = offsets[p]
            for i in range(p * step, min(n, (p + 1) * step)):
                b = bits[i]
                h = _key(b, absolute) >> np.uint32(16)
                if h < ub:
                    out[i] = np.uint32(0)
                else:
                    out[i] = b
                    if h == ub:
                        idx[c] = i
                        c += 1

    @njit(cache=True)
    def _fix_boundary(bits, absolute, idx, need, out):  # pragma: no cover - compiled
        """Zero the ``need`` smallest entries among the boundary bucket's (ties: lower flat index first)."""
        m = idx.size
        lows = np.empty(m, dtype=np.uint32)
        for j in range(m):
            lows[j] = _key(bits[idx[j]], absolute) & np.uint32(0xFFFF)
        order = np.argsort(lows, kind="mergesort")
        for j in range(need):
            out[idx[order[j]]] = np.uint32(0)

    @njit(cache=True, parallel=True)
    def _zero_below(bits, absolute, t_key, n_ties, out):  # pragma: no cover - compiled
        """``out = bits`` with the entries selected as in :func:`_mask_below` set to +0.0."""
        n = bits.size
        t = np.uint32(t_key)
        for i in prange(n):
            b = bits[i]
            out[i] = np.uint32(0) if _key(b, absolute) < t else b
        if n_ties > 0:
            seen = 0
            for i in range(n):
                if _key(bits[i], absolute) == t:
                    out[i] = np.uint32(0)
                    seen += 1
                    if seen == n_ties:
                        break

else:  # pragma: no cover - numba missing: slow numpy fallbacks with the same semantics

    def _np_keys(bits, absolute):
        if absolute:
            return (bits & np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000)
        return _transform_np(bits)

    def _transform(bits):
        return _transform_np(bits)

    def _hist(bits, absolute, bucket, hist, parts):
        keys = _np_keys(bits, absolute)
        if bucket < 0:
            hist += np.bincount(keys >> np.uint32(16), minlength=N_BINS)
        else:
            sel = keys[(keys >> np.uint32(16)) == np.uint32(bucket)]
            hist += np.bincount(sel & np.uint32(0xFFFF), minlength=N_BINS)

    def _mask_below(bits, absolute, t_key, n_ties, out):
        keys = _np_keys(bits, absolute)
        out[:] = keys < np.uint32(t_key)
        if n_ties > 0:
            idx = np.flatnonzero(keys == np.uint32(t_key))[:n_ties]
            out[idx] = True

    def _zero_below(bits, absolute, t_key, n_ties, out):
        mask = np.empty(bits.size, dtype=np.bool_)
        _mask_below(bits, absolute, t_key, n_ties, mask)
        out[:] = np.where(mask, np.uint32(0), bits)

    def get_num_threads():
        return 1

    def _hist_parts(bits, absolute, parts):
        local = np.zeros((1, N_BINS), dtype=np.int64)
        _hist(bits, absolute, -1, local[0], 1)
        return local

    def _zero_split(bits, absolute, bucket, offsets, out, idx, parts):
        h = _np_keys(bits, absolute) >> np.uint32(16)
        out[:] = np.where(h < np.uint32(bucket), np.uint32(0), bits)
        idx[:] = np.flatnonzero(h == np.uint32(bucket))

    def _fix_boundary(bits, absolute, idx, need, out):
        lows = _np_keys(bits[idx], absolute) & np.uint32(0xFFFF)
        out[idx[np.argsort(lows, kind="stable")[:need]]] = 0


def _locate(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Bin holding the k-th (1-based) count and the number of entries in lower bins."""
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, k, side="left"))
    below = int(cum[b - 1]) if b > 0 else 0
    return b, below


#: high-16 buckets whose keys are NaN/Inf: exponent all ones (0x7F80 / 0xFF80 in fp32 bits)
_POS_NONFINITE = (0x7F80 | 0x8000)  # keys of +inf/+nan start here
_NEG_NONFINITE = (~0xFF80) & 0xFFFF  # keys of -inf/-nan end here


class NonFiniteInput(ValueError):
    """A selection met NaN or Inf (they have no rank); found from the histogram, without a separate pass."""


def _check_finite(high: np.ndarray) -> None:
    if high[_POS_NONFINITE:].any() or high[: _NEG_NONFINITE + 1].any():
        raise NonFiniteInput("selection over a tensor with NaN or Inf values")


def high_histogram(x: torch.Tensor, *, absolute: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Pass 1: counts of the high 16 key bits (added into ``out`` when given)."""
    hist = np.zeros(N_BINS, dtype=np.int64) if out is None else out
    _hist(fp32_bits(x), absolute, -1, hist, get_num_threads())
    return hist


def low_histogram(x: torch.Tensor, bucket: int, *, absolute: bool = False) -> np.ndarray:
    """Pass 2: counts of the low 16 key bits of the entries whose high bits equal ``bucket``."""
    hist = np.zeros(N_BINS, dtype=np.int64)
    _hist(fp32_bits(x), absolute, int(bucket), hist, get_num_threads())
    return hist


# ---------------------------------------------------------------------------------------------------------------
# single tensor

def _torch_kth(x: torch.Tensor, k: int, device: str, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.detach().reshape(-1).to(device)
    xf = xf.abs() if absolute else xf
    xf = xf if xf.dtype == torch.float64 else xf.float()
    return xf, torch.kthvalue(xf, k).values


def kth_smallest(x: torch.Tensor, k: int, *, device: str = "cpu", absolute: bool = False) -> Kth:
    """Exact k-th smallest entry of ``x`` (of ``|x|`` with ``absolute``), flattened, 1-based ``k`` as
    ``torch.kthvalue``."""
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if str(device).startswith("cuda") or x.dtype == torch.float64:
        xf, v = _torch_kth(x, k, device if str(device).startswith("cuda") else "cpu", absolute)
        key = int(_transform_np(np.array([float(v)], dtype=np.float32).view(np.uint32))[0])
        return Kth(float(v), key, int((xf < v).sum()), int((xf == v).sum()))
    bits = fp32_bits(x)
    return _kth_of_bits(bits, k, absolute)


def _kth_of_bits(bits: np.ndarray, k: int, absolute: bool) -> Kth:
    hist = np.zeros(N_BINS, dtype=np.int64)
    _hist(bits, absolute, -1, hist, get_num_threads())
    _check_finite(hist)
    b, below_hi = _locate(hist, k)
    hist[:] = 0
    _hist(bits, absolute, b, hist, get_num_threads())
    lo, below_lo = _locate(hist, k - below_hi)
    key = (b << 16) | lo
    return Kth(key_to_float(key), key, below_hi + below_lo, int(hist[lo]))


def smallest_k_mask(x: torch.Tensor, k: int, *, device: str = "cpu", absolute: bool = False) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of exactly ``k`` smallest entries (of ``|x|`` with ``absolute``); ties
    broken by flat index, lower index first. On CUDA the mask is computed and returned on the device."""
    n = x.numel()
    on_cuda = str(device).startswith("cuda")
    where = device if on_cuda else "cpu"
    if k <= 0 or k >= n:
        return torch.full(x.shape, k > 0, dtype=torch.bool, device=where)
    if on_cuda or x.dtype == torch.float64:
        xf, v = _torch_kth(x, k, where, absolute)
        mask = xf < v
        need = k - int(mask.sum())
        eq = xf == v
        if need < int(eq.sum()):
            eq &= torch.cumsum(eq, 0) <= need
        return (mask | eq).reshape(x.shape)
    bits = fp32_bits(x)
    kth = _kth_of_bits(bits, k, absolute)
    return mask_below(bits, kth.key, k - kth.n_less, absolute=absolute).reshape(x.shape)


def zero_smallest_k(x: torch.Tensor, k: int, *, device: str = "cpu", absolute: bool = True) -> torch.Tensor:
    """``x`` with exactly its ``k`` smallest entries (by ``|x|`` with ``absolute``) set to zero, ties broken by flat
    index; same shape, fp32 (fp64 stays fp64). The per-matrix magnitude pruning kernel."""
    k = max(0, min(int(k), x.numel()))
    if str(device).startswith("cuda") or x.dtype == torch.float64:
        mask = smallest_k_mask(x, k, device=device, absolute=absolute)
        xf = x.detach().to(mask.device)
        xf = xf if xf.dtype == torch.float64 else xf.float()
        return xf.masked_fill(mask, 0).cpu()
    bits = fp32_bits(x)
    if k == 0:
        return torch.from_numpy(bits.copy().view(np.float32)).reshape(x.shape)
    # fused: one histogram pass, one pass that zeroes everything below the boundary bucket (and lists the
    # bucket's entries), then a fix-up over that bucket only; one full pass fewer than select-then-zero
    parts = get_num_threads()
    local = _hist_parts(bits, absolute, parts)
    hist = local.sum(0)
    _check_finite(hist)
    b, below_hi = _locate(hist, k)
    counts = local[:, b]
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)[:-1]]).astype(np.int64)
    idx = np.empty(int(counts.sum()), dtype=np.int64)
    out = np.empty_like(bits)
    _zero_split(bits, absolute, b, offsets, out, idx, parts)
    _fix_boundary(bits, absolute, idx, k - below_hi, out)
    return torch.from_numpy(out.view(np.float32)).reshape(x.shape)


def zero_below(bits: np.ndarray, t_key: int, n_ties: int, *, absolute: bool = True) -> torch.Tensor:
    """Flat fp32 copy of ``bits`` with keys below ``t_key`` and the first ``n_ties`` keys equal to it zeroed."""
    out = np.empty_like(bits)
    _zero_below(bits, absolute, int(t_key), int(n_ties), out)
    return torch.from_numpy(out.view(np.float32))


def mask_below(bits: np.ndarray, t_key: int, n_ties: int, *, absolute: bool = False) -> torch.Tensor:
    """Flat bool mask over fp32 ``bits``: keys below ``t_key`` plus the first ``n_ties`` keys equal to it."""
    out = np.empty(bits.size, dtype=np.bool_)
    _mask_below(bits, absolute, int(t_key), int(n_ties), out)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------------------
# streaming over many tensors (global threshold)

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
