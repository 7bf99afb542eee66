"""Exact k-th value selection and "exactly k smallest" masks.

CPU: a two-pass radix select in numba on the fp32 bit pattern. Floats map to uint32 keys whose unsigned order is
the float order (flip all bits of negatives, set the sign bit of non-negatives), so pass 1 histograms the high 16
bits (65,536 bins, one histogram per thread), finds the bucket holding the k-th key, and pass 2 histograms the low
16 bits of the keys in that bucket. Both passes are O(n), parallel and read the data once each; the result is
exact and also yields how many keys lie below and at the k-th value (needed to break ties).

CUDA: ``torch.kthvalue`` on the device (plus two comparisons for the counts).

Zeroing the k smallest of a large tensor (:func:`zero_smallest_k`, magnitude pruning) uses a sampled bracket
instead (:func:`threshold_of_chunks`): the k-th key is estimated from a random sample, one branch-free streaming
pass counts the entries below the bracket and lists the keys of the few inside it, and the exact k-th value is
selected among those (the radix select is the fallback when the count shows the bracket missed); a second pass
zeroes below it (:func:`zero_below_bits`), or each piece on its way to a file (:func:`zero_below_piece`). The
one-read route for fp32/bf16 storage: :mod:`surgeon.kernels.select_band`. Global selection over many tensors:
:mod:`surgeon.kernels.select_global`. Reference for tests: ``torch.kthvalue`` and a stable sort.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
        # negatives: all bits flipped; non-negatives: the sign bit set (branch-free: b ^ mask)
        flip = np.uint32(np.uint32(b >> np.uint32(31)) * np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000)
        return np.uint32(b ^ flip)

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

    @njit(cache=True)
    def _band_part(bits, absolute, ulo, width, got):  # pragma: no cover - compiled
        """One part of :func:`_band_split`, indexed from 0 (loops over a slice's own range vectorise; bounds
        computed inside a loop over parts did not: 2.5 ns per entry against 0.7). First a branch-free pass that
        counts; then, only when the bracket holds entries, a second pass that lists their keys into ``got``, the
        list cursor advanced by the compare."""
        below = 0
        inside = 0
        bad = 0
        exp = np.uint32(0x7F800000)
        for i in range(bits.size):
            b = bits[i]
            k = _key(b, absolute)
            below += k < ulo
            bad += (b & exp) == exp
            inside += np.uint32(k - ulo) <= width
        if inside:
            c = 0
            for i in range(bits.size):
                k = _key(bits[i], absolute)
                got[c] = k
                c += np.uint32(k - ulo) <= width
        return below, inside, bad

    @njit(cache=True, parallel=True)
    def _band_split(bits, absolute, lo, hi, keys, cap, counts, parts):  # pragma: no cover - compiled
        """One streaming pass for the sampled bracket ``[lo, hi]`` (keys): count the entries below ``lo`` and
        list the keys inside the bracket. Part ``p`` lists from ``keys[p·cap]`` on in flat order (``cap`` = the
        part's length: no overflow). ``counts[p] = (below, inside, NaN/Inf)``."""
        n = bits.size
        ulo = np.uint32(lo)
        width = np.uint32(hi) - ulo
        for p in prange(parts):
            lo_i = p * cap
            hi_i = min(n, lo_i + cap)
            below, inside, bad = _band_part(bits[lo_i:hi_i], absolute, ulo, width, keys[lo_i:lo_i + cap])
            counts[p, 0] = below
            counts[p, 1] = inside
            counts[p, 2] = bad

    #: the same pass on the calling thread: a parallel region's fork/join (and its threads spinning after it) costs
    #: milliseconds of CPU per call, more than the pass over a tensor below ~4 M entries; the writer's pool already
    #: prunes several tensors at once
    _band_split_serial = njit(cache=True)(_band_split.py_func)

    @njit(cache=True, parallel=True)
    def _zero_below(bits, absolute, t_key, n_ties, out):  # pragma: no cover - compiled
        """``out = bits`` with the entries selected as in :func:`_mask_below` set to +0.0; returns how many of
        the ``n_ties`` entries equal to the threshold it met (a piece of a tensor may hold fewer)."""
        n = bits.size
        t = np.uint32(t_key)
        equal = 0
        for i in prange(n):
            b = bits[i]
            k = _key(b, absolute)
            out[i] = np.uint32(0) if k < t else b
            equal += k == t
        seen = 0
        if n_ties > 0 and equal > 0:  # a piece of a tensor often holds none of the ties still owed
            for i in range(n):
                if _key(bits[i], absolute) == t:
                    out[i] = np.uint32(0)
                    seen += 1
                    if seen == n_ties:
                        break
        return seen

    _zero_below_serial = njit(cache=True)(_zero_below.py_func)

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
        return min(int(n_ties), int(np.count_nonzero(_np_keys(bits, absolute) == np.uint32(t_key))))

    def get_num_threads():
        return 1

    def _band_split(bits, absolute, lo, hi, got, cap, counts, parts):
        keys = _np_keys(bits, absolute)
        below = keys < np.uint32(lo)
        inside = np.flatnonzero(~below & (keys <= np.uint32(hi)))
        got[: min(inside.size, cap)] = keys[inside[:cap]]
        counts[:] = 0
        counts[0] = (int(below.sum()), inside.size, int(((bits & 0x7F800000) == 0x7F800000).sum()))

    _band_split_serial = _band_split
    _zero_below_serial = _zero_below


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
    return torch.from_numpy(zero_smallest_k_bits(fp32_bits(x), k, absolute).view(np.float32)).reshape(x.shape)


def zero_smallest_k_bits(bits: np.ndarray, k: int, absolute: bool = True) -> np.ndarray:
    """:func:`zero_smallest_k` on flat fp32 bit patterns (uint32, numpy; no torch): a new array."""
    k = max(0, min(int(k), bits.size))
    if k == 0:
        return bits.copy()
    t_key, n_ties = threshold_of_chunks(lambda: iter([bits]), bits.size, k, lambda at: bits[at], absolute=absolute)
    return zero_below_bits(bits, t_key, n_ties, absolute=absolute)


# ---------------------------------------------------------------------------------------------------------------
# sampled bracket: estimate the k-th key from a sample, then one streaming pass around it

#: tensors smaller than this use the radix select (the sample would be most of the tensor)
BRACKET_MIN = 1 << 16
#: tensors up to this many entries per thread are split on the calling thread
SERIAL_MAX = 1 << 22
#: half-width of the bracket in standard deviations of the sample's rank count (z = 5: a miss ~ 1 in 3.5 M)
BRACKET_Z = 5.0


def keys_of(bits: np.ndarray, absolute: bool) -> np.ndarray:
    """Order-preserving uint32 keys of fp32 ``bits`` (of ``|x|`` with ``absolute``), numpy."""
    if absolute:
        return (bits & np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000)
    return _transform_np(bits)


def sample_size(n: int) -> int:
    """Entries sampled from ``n``: n/16, between 2,048 and 32,768."""
    return int(min(n, max(2048, min(1 << 15, n // 16))))


def bracket_ranks(s: int, q: float, z: float = BRACKET_Z) -> tuple[int, int]:
    """Ranks ``(a, b)`` in a sample of ``s`` whose keys bracket the population's ``q``-quantile with high
    probability: ``z`` binomial standard deviations (√(s·q·(1−q))) below and above rank q·s, each side widened by
    2. ``a < 0`` / ``b >= s``: no bound on that side."""
    r = q * s
    d = z * math.sqrt(s * q * (1 - q)) + 2
    return math.floor(r - d), math.ceil(r + d)


def bracket(sample: np.ndarray, q: float, z: float = BRACKET_Z) -> tuple[int, int]:
    """Keys ``(lo, hi)`` that hold the ``q``-quantile of the population with high probability: the sample's
    order statistics at :func:`bracket_ranks`."""
    s = sample.size
    a, b = bracket_ranks(s, q, z)
    ranks = [i for i in (a, b) if 0 <= i < s]
    part = np.partition(sample, ranks) if ranks else sample
    lo = int(part[a]) if a >= 0 else 0
    hi = int(part[b]) if b < s else 0xFFFFFFFF
    return lo, hi


def split_bracket(bits: np.ndarray, lo: int, hi: int, absolute: bool) -> tuple[np.ndarray, int, int]:
    """One pass over fp32 ``bits``: (the keys inside ``[lo, hi]`` in flat order, how many entries lie below
    ``lo``, how many are NaN/Inf)."""
    parts = max(1, min(get_num_threads(), bits.size // SERIAL_MAX))
    step = (bits.size + parts - 1) // parts
    # room for every entry of a part: pages never written are never backed, so only the bracket costs memory
    got = np.empty(parts * step, dtype=np.uint32)
    counts = np.zeros((parts, 3), dtype=np.int64)
    (_band_split if parts > 1 else _band_split_serial)(bits, absolute, lo, hi, got, step, counts, parts)
    inside = np.concatenate([got[p * step: p * step + counts[p, 1]] for p in range(parts)])
    return inside, int(counts[:, 0].sum()), int(counts[:, 2].sum())


def choose_in_bracket(keys: np.ndarray, need: int) -> tuple[int, int]:
    """(key of the ``need``-th smallest of ``keys``, how many are strictly below it); ``need`` >= 1."""
    t = np.partition(keys, need - 1)[need - 1]
    return int(t), int(np.count_nonzero(keys < t))


def zero_below_bits(bits: np.ndarray, t_key: int, n_ties: int, *, absolute: bool = True) -> np.ndarray:
    """Copy of the fp32 bit patterns ``bits`` with keys below ``t_key`` and the first ``n_ties`` keys equal to it
    zeroed (uint32, numpy)."""
    out = np.empty_like(bits)
    serial = bits.size <= SERIAL_MAX * get_num_threads()
    (_zero_below_serial if serial else _zero_below)(bits, absolute, int(t_key), int(n_ties), out)
    return out


def zero_below_piece(bits: np.ndarray, t_key: int, n_ties: int, out: np.ndarray, *, absolute: bool = True) -> int:
    """:func:`zero_below_bits` of one piece of a tensor into ``out`` (same size, on the calling thread); returns
    how many entries equal to the threshold it zeroed, so the next piece gets the ties still owed."""
    return int(_zero_below_serial(bits, absolute, int(t_key), int(n_ties), out))


def threshold_of_chunks(chunks: Callable[[], Iterator[np.ndarray]], n: int, k: int,
                        sample: Callable[[np.ndarray], np.ndarray], *, absolute: bool = True) -> tuple[int, int]:
    """``(t_key, n_ties)`` such that zeroing the keys below ``t_key`` and the first ``n_ties`` keys equal to it
    (flat order) zeroes exactly the ``k`` smallest of ``n`` fp32 bit patterns, without writing anything:
    ``chunks()`` yields the patterns in order (one array, or converted pieces of a narrower dtype) and
    ``sample(flat indices)`` some of them (drawn uniformly with a fixed seed: runs are reproducible). The sampled
    bracket's pass over the chunks (:class:`surgeon.kernels.select_global.BracketKth`) keeps only the keys inside
    the bracket; the exact radix select (over all chunks at once) runs where the bracket misses or the tensor is
    small. Raises :class:`NonFiniteInput` on NaN/Inf. ``1 <= k <= n``."""
    from .select_global import BracketKth

    if n >= BRACKET_MIN:
        at = np.random.default_rng(n).integers(0, n, sample_size(n))
        found = BracketKth(k, *bracket(keys_of(sample(at), absolute), k / n), absolute=absolute)
        count = 0
        for count, c in enumerate(chunks(), 1):
            found.add_bits(c, count - 1)
        got = found.result(count)
        if got is not None:
            return got[0], k - got[1]
    parts = list(chunks())
    kth = _kth_of_bits(parts[0] if len(parts) == 1 else np.concatenate(parts), k, absolute)
    return kth.key, k - kth.n_less


def zero_below(bits: np.ndarray, t_key: int, n_ties: int, *, absolute: bool = True) -> torch.Tensor:
    """:func:`zero_below_bits` as a flat fp32 tensor."""
    return torch.from_numpy(zero_below_bits(bits, t_key, n_ties, absolute=absolute).view(np.float32))


def mask_below(bits: np.ndarray, t_key: int, n_ties: int, *, absolute: bool = False) -> torch.Tensor:
    """Flat bool mask over fp32 ``bits``: keys below ``t_key`` plus the first ``n_ties`` keys equal to it."""
    out = np.empty(bits.size, dtype=np.bool_)
    _mask_below(bits, absolute, int(t_key), int(n_ties), out)
    return torch.from_numpy(out)
