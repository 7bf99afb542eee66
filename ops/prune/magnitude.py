"""Magnitude pruning: zero the smallest |w| of the selected matrices, per matrix, globally, or N:M.

- ``scope: layer`` (default, as PERP and the Wanda/SparseGPT magnitude baselines): each matrix loses exactly
  k = ⌊s·numel⌋ entries, the k smallest |w|, ties broken by flat index (``surgeon.kernels.select``).
- ``scope: global``: one exact threshold over all selected matrices. Streaming ``Reduce`` passes over the
  selected tensors (a sample of |w| from each, then one pass counting the entries below a bracket around the
  sample's estimate and keeping the keys inside it) find the k-th smallest |w| while holding only the bracket's
  keys; every prune node depends on that reduction. Costs one extra read of the selected tensors (two more
  histogram passes only in the rare case the bracket missed).
- ``nm: "N:M"``: keep the N largest of every M consecutive inputs of each output row (along d_in; GPT-2 Conv1D
  storage is [d_in, d_out], so groups run along dim 0 there).

Output stays dense with exact zeros and no ``sparsity_config`` (vLLM rejects declared 2:4 sparsity).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from surgeon.kernels.host_dtypes import STORAGE, convert
from surgeon.kernels.nm_select import nm_zero
from surgeon.kernels.nm_select import supported as nm_supported
from surgeon.kernels.select import (
    NonFiniteInput,
    bracket,
    fp32_bits,
    key_to_float,
    sample_size,
    threshold_of_chunks,
    zero_below,
    zero_below_piece,
    zero_smallest_k,
    zero_smallest_k_bits,
)
from surgeon.kernels.select_band import zero_smallest_k_once
from surgeon.kernels.select_global import BracketKth, StreamingKth, sample_tensor

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph, Node, Reduce
from surgeon.numeric import check_finite
from surgeon.registry import register
from surgeon.tensorfile import HostArray

from .common import (
    ARCH_HELP,
    EXCLUDE_HELP,
    INCLUDE_HELP,
    Fresh,
    NmPattern,
    Pruned,
    check_nm_shapes,
    check_sparsity_matches_nm,
    nm_prune,
    parse_nm,
    prune_targets,
    read_again,
    sparsity_facts,
    transposed_names,
)
from .protect import (
    FRACTION_HELP,
    MODE_HELP,
    PROTECT_HELP,
    Protection,
    ProtectMode,
    plan_protection,
    protect_score,
    prune_smallest,
    restore_protected,
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of the weights of each selected matrix "
                            "(or of all of them with --scope global) set to zero.")
    scope: Literal["layer", "global"] = Field("layer", description="layer: one threshold per matrix (exactly "
                                              "⌊s·numel⌋ zeros each); global: one threshold over all selected "
                                              "matrices (streamed, exact).")
    nm: NmPattern = Field(None, description="Semi-structured N:M pattern, e.g. '2:4': keep N of every M "
                           "consecutive inputs per output row (sparsity is then 1 - N/M).")
    include: list[str] | None = Field(None, description=INCLUDE_HELP)
    exclude: list[str] = Field(default_factory=list, description=EXCLUDE_HELP)
    arch: dict[str, Any] | None = Field(None, description=ARCH_HELP)
    protect_edits: bool | None = Field(None, description=PROTECT_HELP)
    protect_mode: ProtectMode = Field("refit", description=MODE_HELP)
    protect_fraction: float = Field(0.05, ge=0, le=0.5, description=FRACTION_HELP)

    @model_validator(mode="after")
    def _nm_consistent(self) -> Params:
        if parse_nm(self.nm) is not None and self.scope != "layer":
            raise ValueError("nm: N:M pruning is per row; it cannot be combined with scope=global")
        check_sparsity_matches_nm(self.sparsity, self.nm, "sparsity" in self.model_fields_set)
        return self


# --- pure tensor math --------------------------------------------------------------------------------------

def n_pruned(numel: int, sparsity: float) -> int:
    """k = ⌊s·numel⌋ (with a guard against 0.3·10 = 2.9999…)."""
    return min(numel, math.floor(sparsity * numel + 1e-9))


def magnitude_prune(w: torch.Tensor, sparsity: float, *, device: str = "cpu") -> torch.Tensor:
    """``w`` with exactly ⌊s·numel⌋ of its smallest-magnitude entries zeroed (fp32 result)."""
    return zero_smallest_k(w, n_pruned(w.numel(), sparsity), device=device, absolute=True)


UNRANKABLE = ("magnitude pruning ranks weights by size and NaN/Inf have no rank; --allow-nonfinite only lets "
              "such tensors pass through ops that do not rank them: exclude it with --exclude")


def unrankable(name: str) -> SurgeonError:
    return SurgeonError(f"tensor {name!r} contains NaN or Inf ({UNRANKABLE})")


def _finite_magnitude_prune(name: str, sparsity: float, device: str, protect: Protection, transposed: bool):
    def fn(w: torch.Tensor) -> torch.Tensor:
        rank_last = protect.rank_mask(name)
        k = n_pruned(w.numel(), sparsity)
        if rank_last is not None or k == 0 or device != "cpu" or w.dtype == torch.float64:
            check_finite(name, w, UNRANKABLE)  # paths without the CPU kernel's histogram
        if rank_last is not None:  # an edited matrix: the edit's entries rank last (see .protect)
            out = prune_smallest(w, k, rank_last)
        else:
            try:
                out = magnitude_prune(w, sparsity, device=device)
            except NonFiniteInput:  # the selection's histogram shows NaN/Inf: no separate pass over w
                raise unrankable(name) from None
        return protect.finish(name, out, w, transposed)

    return fn


def _host_magnitude_prune(name: str, sparsity: float):
    """:func:`_finite_magnitude_prune` on raw storage (no protection, CPU): the source is read from its map
    without the copy torch computations get, and the selection's own pass refuses NaN/Inf. Same bytes.
    fp32/bfloat16 storage is pruned in one read (:func:`zero_smallest_k_once`), other cases in two."""
    def fn(w: HostArray) -> HostArray:
        flat = w.data.reshape(-1)
        k = n_pruned(flat.size, sparsity)
        try:
            once = zero_smallest_k_once(flat, w.dtype, k) if k else None
            if once is not None:
                return HostArray(once.view(STORAGE[w.dtype]), w.dtype, w.shape)
            bits = (flat if w.dtype == "float32" else convert(flat, w.dtype, "float32")).view(np.uint32)
            out = zero_smallest_k_bits(bits, k, absolute=True)
        except NonFiniteInput:
            raise unrankable(name) from None
        return HostArray(out.view(np.float32), "float32", w.shape)

    return fn


#: entries of a non-fp32 source converted to fp32 at a time by the streamed threshold pass (8 MiB of fp32)
STREAM_CHUNK = 1 << 21
#: source tensors from this size on are streamed in two reads (:func:`_magnitude_stream`), holding no buffer of
#: their size; smaller ones are pruned whole in one read (:func:`_host_magnitude_prune`)
STREAM_MIN_BYTES = 64 << 20


def _magnitude_stream(name: str, sparsity: float):
    """:func:`_host_magnitude_prune` piece by piece (``Apply.stream_fn``): a read-only pass over the whole source
    finds the threshold key and how many entries equal to it are zeroed (:func:`threshold_of_chunks`; it refuses
    NaN/Inf), then each piece is zeroed below it into one reused buffer, the ties in flat order across pieces.
    Same bytes as the whole-tensor path; no buffer of the tensor's size (a non-fp32 source is converted
    ``STREAM_CHUNK`` entries at a time)."""
    def prepare(w: HostArray):
        flat = w.data.reshape(-1)
        n, k = flat.size, n_pruned(flat.size, sparsity)

        def bits(a: np.ndarray) -> np.ndarray:
            return (a if w.dtype == "float32" else convert(a, w.dtype, "float32")).view(np.uint32)

        if k == 0:
            t_key, ties = 0, 0  # every |x| key is at least 0x80000000: nothing below 0
        else:
            step = n if w.dtype == "float32" else STREAM_CHUNK
            try:
                t_key, ties = threshold_of_chunks(lambda: (bits(flat[i:i + step]) for i in range(0, n, step)), n, k,
                                                  lambda at: bits(flat[at]))
            except NonFiniteInput:
                raise unrankable(name) from None
        return _zero_pieces(w.dtype, t_key, ties)

    return prepare


def _zero_pieces(dtype: str, t_key: int, ties: int, zeros: Callable[[int, int], None] | None = None):
    """The piece function of a streamed prune: each consecutive piece of a ``dtype`` tensor with the keys below
    ``t_key`` zeroed, and the first ``ties`` keys equal to it (flat order, carried from piece to piece), into one
    reused buffer; ``zeros(count, size)`` is told how many zeros each piece holds, and its size."""
    buf = np.empty(0, np.uint32)
    owed = ties

    def piece(x: np.ndarray) -> np.ndarray:
        nonlocal buf, owed
        if buf.size < x.size:
            buf = np.empty(x.size, np.uint32)
        out = buf[: x.size]
        owed -= zero_below_piece((x if dtype == "float32" else convert(x, dtype, "float32")).view(np.uint32),
                                 t_key, owed, out)
        if zeros is not None:  # above a threshold of zero no -0.0 is left: counting the bits is exact (and faster)
            zeros(x.size - int(np.count_nonzero(out if t_key > 0x80000000 else out.view(np.float32))), x.size)
        return out.view(np.float32) if dtype == "float32" else convert(out.view(np.float32), "float32", dtype)

    return piece


def _global_stream(index: int, facts: dict[str, Any], name: str):
    """:func:`_prune_below` piece by piece (``Apply.stream_fn``, the reduction's value given beside the source):
    the threshold and this tensor's ties come from the global reduction, so the source is read once here; the
    tensor's sparsity goes to ``facts`` once its last piece is zeroed."""
    def prepare(w: HostArray, reduced: torch.Tensor):
        n, seen = w.data.size, [0, 0]  # zeros, entries

        def zeros(count: int, size: int) -> None:
            seen[0] += count
            seen[1] += size
            if seen[1] == n:
                _record_sparsity(facts, name, seen[0] / n)

        return _zero_pieces(w.dtype, int(reduced[0]), int(reduced[1 + index]), zeros)

    return prepare


def _record_sparsity(facts: dict[str, Any], name: str, frac: float) -> None:
    facts["sparsity_per_tensor"][name] = round(frac, 6)
    if frac > 0.95:
        facts["above_95_percent"].append(name)


class Deferred(Node):
    """A stand-in input of a reduction that may not need ``inner``: its own value is an empty tensor (nothing
    read, no graph edge), and the reduction's step computes :meth:`value` only when it must. The exact fallback
    passes below read nothing when the bracket held the threshold (almost always)."""

    def __init__(self, inner: Node):
        self.fresh = Fresh(inner)
        self.shape, self.dtype, self.label = (0,), inner.dtype, f"deferred({inner.label})"

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype)

    def value(self) -> torch.Tensor:
        return self.fresh.compute([])


def _ties(k: int, n_less: int, equal: list[int]) -> list[int]:
    """How many entries equal to the threshold each tensor zeroes: exactly k in all, earlier tensors first."""
    need, ties = k - n_less, []
    for e in equal:
        ties.append(min(e, need))
        need -= ties[-1]
    return ties


def global_sample_size(total: int) -> int:
    """Entries sampled over all selected matrices for the global bracket: total/64, between 32,768 and 2²⁰.
    The bracket's keys are held until the threshold is chosen (about 5/√s of all entries, three copies at the
    peak), so a model of billions of weights takes the larger sample: 0.5 % of 7 B entries instead of 3 %."""
    return int(min(total, max(sample_size(total), min(1 << 20, total // 64))))


def global_threshold_nodes(nodes: list, k: int, facts: dict[str, Any], names: list[str] | None = None) -> Reduce:
    """Streaming reductions giving ``[threshold_key, ties_0, ties_1, …]`` (int64): the k-th smallest |w| over
    all ``nodes`` as an order-preserving fp32 key, and how many entries equal to it each tensor must zero so that
    exactly k go overall (ties broken by tensor order, then flat index). A sample pass picks a bracket, one pass
    counts below it and keeps the keys inside (``kernels/select_global.py``); two histogram passes run only if
    the bracket missed."""
    n = len(nodes)
    total = sum(x.shape[0] * x.shape[1] for x in nodes)
    sizes = [max(16, round(global_sample_size(total) * x.shape[0] * x.shape[1] / total)) for x in nodes]

    def refuse(i: int) -> SurgeonError:
        return unrankable(names[i] if names else f"#{i}")

    def sample_step(acc: list, v: torch.Tensor, i: int) -> list:
        return [*acc, sample_tensor(v, sizes[i], seed=i)]

    sample = Reduce([read_again(x) for x in nodes], init=list, step=sample_step, shape=(2,), dtype=torch.int64,
                    finish=lambda acc: torch.tensor(bracket(np.concatenate(acc), k / total), dtype=torch.int64),
                    label="magnitude-sample", merge=lambda a, b: a + b)

    def count_step(acc: BracketKth, v: torch.Tensor, i: int) -> BracketKth:
        try:
            acc.add(v, i)  # refuses NaN/Inf from the same pass
        except NonFiniteInput:
            raise refuse(i) from None
        return acc

    def count_finish(acc: BracketKth) -> torch.Tensor:
        got = acc.result(n)
        if got is None:
            return torch.zeros(n + 2, dtype=torch.int64)
        return torch.tensor([1, got[0], *_ties(k, got[1], got[2])], dtype=torch.int64)

    counted = Reduce([read_again(x) for x in nodes], given=[sample], shape=(n + 2,), dtype=torch.int64,
                     init=lambda lohi: BracketKth(k, int(lohi[0]), int(lohi[1])), step=count_step,
                     finish=count_finish, label="magnitude-bracket", merge=BracketKth.merged)
    return _fallback_passes(counted, nodes, k, facts, refuse)


def _fallback_passes(counted: Reduce, nodes: list, k: int, facts: dict[str, Any], refuse) -> Reduce:
    """The exact two-histogram select over the same tensors, run only when ``counted`` says its bracket
    missed; its result (or ``counted``'s) without the flag."""
    n = len(nodes)
    deferred = [Deferred(x) for x in nodes]  # one list per pass: a node with two consumers would be cached

    def high_step(acc: tuple, v: torch.Tensor, i: int) -> tuple:
        if not int(acc[0][0]):
            try:
                acc[1].add_high(deferred[i].value())
            except NonFiniteInput:  # pragma: no cover - the bracket pass refused it already
                raise refuse(i) from None
        return acc

    high = Reduce(deferred, given=[counted], init=lambda c: (c, StreamingKth(k)), step=high_step,
                  finish=lambda acc: torch.from_numpy(acc[1].high.copy()), shape=(1 << 16,), dtype=torch.int64,
                  label="magnitude-histogram", merge=lambda a, b: (a[0], a[1].merged_high(b[1])))

    def low_init(c: torch.Tensor, histogram: torch.Tensor) -> tuple:
        acc = StreamingKth(k)
        acc.high[:] = histogram.numpy()
        acc.n_seen = int(histogram.sum())
        return c, acc

    def low_step(acc: tuple, v: torch.Tensor, i: int) -> tuple:
        if not int(acc[0][0]):
            acc[1].add_low(deferred[i].value(), i)
        return acc

    def finish(acc: tuple) -> torch.Tensor:
        c, s = acc
        if int(c[0]):
            out = c[1:].clone()
        else:
            key, n_less, equal = s.result(n)
            out = torch.tensor([key, *_ties(k, n_less, equal)], dtype=torch.int64)
        facts["threshold"] = key_to_float(int(out[0]))  # filled in place: the report sees it once written
        return out

    return Reduce([Deferred(x) for x in nodes], given=[counted, high], init=low_init, step=low_step, finish=finish,
                  shape=(n + 1,), dtype=torch.int64, label="magnitude-threshold",
                  merge=lambda a, b: (a[0], a[1].merged_low(b[1])))


def _prune_below(index: int, facts: dict[str, Any], name: str, protect: Protection, transposed: bool):
    def fn(reduced: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bits = fp32_bits(w)
        out = zero_below(bits, int(reduced[0]), int(reduced[1 + index]), absolute=True).reshape(w.shape)
        out = protect.finish(name, restore_protected(out, w, protect.rank_mask(name)), w, transposed)
        _record_sparsity(facts, name, (out.numel() - int(np.count_nonzero(out.cpu().numpy()))) / out.numel())
        return out

    return fn


#: entries every streamed piece is a multiple of (pieces are whole 4 KiB multiples of the entry width): an N:M
#: stream needs m to divide it, so that no group straddles two pieces
NM_PIECE_ENTRIES = 1024


def _nm_host(n: int, m: int):
    """:func:`nm_prune` (groups along rows) on raw fp32/bf16 storage, in its own dtype (C kernel; same bytes)."""
    def fn(w: HostArray) -> HostArray:
        return HostArray(nm_zero(w.data.reshape(-1), w.dtype, n, m).view(STORAGE[w.dtype]), w.dtype, w.shape)

    return fn


def _nm_stream(n: int, m: int):
    """:func:`_nm_host` piece by piece (``Apply.stream_fn``): groups are independent, so each piece (whole
    groups) is pruned into one reused buffer on its way to the file, the source read once."""
    def prepare(w: HostArray):
        buf = np.empty(0, STORAGE[w.dtype])

        def piece(x: np.ndarray) -> np.ndarray:
            nonlocal buf
            if buf.size < x.size:
                buf = np.empty(x.size, STORAGE[w.dtype])
            return nm_zero(x, w.dtype, n, m, buf[: x.size].view(np.uint32 if w.dtype == "float32" else np.uint16)
                           ).view(STORAGE[w.dtype])

        return piece

    return prepare


def _nm_protected(w: torch.Tensor, n: int, m: int, transposed: bool, name: str, protect: Protection) -> torch.Tensor:
    rank_last = protect.rank_mask(name)
    score = None if rank_last is None else protect_score(w.float().abs(), rank_last)
    return protect.finish(name, nm_prune(w, n, m, transposed=transposed, score=score), w, transposed)


# --- graph wiring ---------------------------------------------------------------------------------------------

def _plain(dense: Node, name: str, device: str, protect: Protection) -> bool:
    """A matrix pruned on raw storage (CPU, fp32/bf16/fp16, no protected edit): the host and streamed paths."""
    return (device == "cpu" and dense.dtype_name != "float64" and protect.rank_mask(name) is None
            and name not in protect.keys)


def _checked(node: Pruned, name: str, protect: Protection) -> Pruned:
    """Zeroing entries of a tensor whose NaN/Inf were refused keeps it finite: the writer need not check the
    result again (unless an edit is refitted into it, which computes new values)."""
    node.finite = name not in protect.keys
    return node


@register("prune.magnitude", Params, summary="Magnitude pruning: per-layer, global or N:M.")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Magnitude pruning: per-layer, global or N:M."""
    graph = graph.copy()
    names = prune_targets(graph, params.include, params.exclude, params.arch, ctx=ctx)
    nm = parse_nm(params.nm)
    dev = ctx.device
    protect = plan_protection(graph, names, params.protect_edits, params.protect_mode, params.protect_fraction)
    ctx.report(**protect.facts(params.protect_fraction))
    trans = transposed_names(graph, names, params.arch, ctx=ctx)
    if nm is not None:
        n, m = nm
        check_nm_shapes(graph, names, m, trans)
        for name in names:
            dense = graph[name]
            t = name in trans
            raw = (_plain(dense, name, dev, protect) and not t and nm_supported(dense.dtype_name, m)
                   and NM_PIECE_ENTRIES % m == 0)
            graph.replace(name, Pruned(lambda w, t=t, name=name: _nm_protected(w, n, m, t, name, protect),
                                       [dense], dense=dense, label=f"prune-{n}:{m}",
                                       host_fn=_nm_host(n, m) if raw else None,
                                       stream_fn=_nm_stream(n, m) if raw else None))
        numel = {name: graph[name].shape[0] * graph[name].shape[1] for name in names}
        ctx.report(method="magnitude", nm=params.nm, transposed=sorted(trans),
                   **sparsity_facts({k: (v * (m - n) // m, v) for k, v in numel.items()}))
    elif params.scope == "layer":
        per_tensor = {}
        for name in names:
            dense = graph[name]
            numel = dense.shape[0] * dense.shape[1]
            plain = _plain(dense, name, dev, protect)
            graph.replace(name, _checked(Pruned(_finite_magnitude_prune(name, params.sparsity, dev, protect,
                                                                        name in trans),
                                                [dense], dense=dense, label="prune-magnitude",
                                                host_fn=_host_magnitude_prune(name, params.sparsity) if plain else None,
                                                stream_fn=_magnitude_stream(name, params.sparsity)
                                                if plain and dense.nbytes >= STREAM_MIN_BYTES else None),
                                         name, protect))
            per_tensor[name] = (n_pruned(numel, params.sparsity), numel)
        ctx.report(method="magnitude", scope="layer", **sparsity_facts(per_tensor))
    else:
        nodes = [graph[n] for n in names]
        total = sum(x.shape[0] * x.shape[1] for x in nodes)
        k = n_pruned(total, params.sparsity)
        facts: dict[str, Any] = {"threshold": None, "sparsity_per_tensor": {}, "above_95_percent": []}
        if k == 0:
            ctx.report(method="magnitude", scope="global", sparsity=0.0, pruned_tensors=len(names))
            return graph
        reduced = global_threshold_nodes(nodes, k, facts, names)
        for i, (name, dense) in enumerate(zip(names, nodes)):
            stream = _global_stream(i, facts, name) if _plain(dense, name, dev, protect) else None
            graph.replace(name, _checked(Pruned(_prune_below(i, facts, name, protect, name in trans),
                                                [reduced, dense], dense=dense, label="prune-magnitude-global",
                                                stream_fn=stream), name, protect))
        # per-tensor sparsity is only known once the threshold has streamed; the dict is filled while writing
        ctx.report(method="magnitude", scope="global", sparsity=round(k / total, 6), pruned_tensors=len(names),
                   pruned_parameters=total, global_threshold=facts)
    return graph
