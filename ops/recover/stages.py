"""CheckFree's pure pieces: the stage partition, which stages rebuild a lost one, layer alignment between stages
of different lengths, the weighted average (Eq. 1) and the gradient-norm weights (Blagoev et al., arXiv
2506.15461)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch


def stage_partition(n_layers: int, stages: int | None = None, ranges: Sequence[str] = ()) -> list[list[int]]:
    """Layers of each stage: ``stages`` equal parts (stage s = layers [s·n, (s+1)·n)) or explicit ranges."""
    if stages is not None:
        if n_layers % stages:
            raise SurgeonError(f"recover --stages {stages}: {n_layers} layers do not split equally; give "
                               f"--stage-layers with explicit ranges (e.g. 0-4,5-9,...)")
        n = n_layers // stages
        return [list(range(s * n, (s + 1) * n)) for s in range(stages)]
    out: list[list[int]] = []
    nxt = 0
    for part in ranges:
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if lo != nxt or hi < lo:
            raise SurgeonError(f"recover --stage-layers: range {part!r} should start at layer {nxt} and not end "
                               f"before it (ranges are inclusive, in order, without gaps)")
        out.append(list(range(lo, hi + 1)))
        nxt = hi + 1
    if nxt != n_layers:
        raise SurgeonError(f"recover --stage-layers: ranges cover layers 0-{nxt - 1}, the model has {n_layers} "
                           f"layers (0-{n_layers - 1})")
    return out


def aligned_layer(j: int, n: int, m: int) -> int:
    """Index in a neighbour stage of ``m`` layers for layer ``j`` of a stage of ``n`` layers (centre alignment)."""
    return min(m - 1, int((j + 0.5) * m / n))


def recovery_sources(stage: int, n_stages: int, plus: bool) -> list[int] | None:
    """Stages a lost ``stage`` is rebuilt from: two neighbours to average, one swap partner to copy (CheckFree+),
    or ``None`` for an edge stage of plain CheckFree (restored from an earlier copy, not from neighbours).

    CheckFree+ (reference ``ours-grad-avg`` with swapped stages): first <-> second and penultimate <-> last are
    swap partners; the branches are tested in the reference's order (last, first, second, penultimate).
    """
    last = n_stages - 1
    if plus:
        if n_stages == 3 and stage == 1:
            raise SurgeonError("recover --plus: with 3 stages the middle stage is both the second and the "
                               "penultimate, so CheckFree+'s swap pairs overlap; recover it without --plus (average)")
        if stage == last:
            return [last - 1]
        if stage == 0:
            return [1]
        if stage == 1:
            return [0]
        if stage == last - 1:
            return [last]
    if stage in (0, last):
        return None
    return [stage - 1, stage + 1]


def checkfree_average(prev: torch.Tensor, nxt: torch.Tensor, w_prev: float, w_next: float) -> torch.Tensor:
    """CheckFree Eq. 1: (ω₋·W_{s−1} + ω₊·W_{s+1}) / (ω₋ + ω₊), in fp32."""
    return (prev.float() * w_prev + nxt.float() * w_next) / (w_prev + w_next)


def grad_norms_from(data: Any, n_stages: int, where: str) -> dict[int, float]:
    """Per-stage gradient norms from decoded JSON: a list by stage, or ``{stage: norm}``, optionally under
    ``grad_norms``. Raises :class:`SurgeonError` naming ``where`` (the option and file) and the bad entry."""
    if isinstance(data, dict) and "grad_norms" in data:
        data = data["grad_norms"]
    if isinstance(data, list):
        items = list(enumerate(data))
    elif isinstance(data, dict):
        items = []
        for k, v in data.items():
            try:
                items.append((int(k), v))
            except ValueError:
                raise SurgeonError(f"{where}: key {k!r} is not a stage index") from None
    else:
        raise SurgeonError(f"{where}: expected a list of per-stage gradient norms or a {{stage: norm}} object")
    out: dict[int, float] = {}
    for s, v in items:
        if not 0 <= s < n_stages:
            raise SurgeonError(f"{where}: stage {s} out of range (the partition has {n_stages} stages)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SurgeonError(f"{where}: stage {s}: gradient norm must be a finite number >= 0, got {v!r}")
        out[s] = float(v)
    return out
