"""The sequential model engine (block by block; see :mod:`surgeon.engine.core` and docs/engine.md).

A framework package: model-family knowledge comes from :mod:`surgeon.arch`; nothing here imports ``surgeon.ops``.
"""
from __future__ import annotations

from surgeon.engine.core import Block, Engine, HeadOutput, MicroBatch
from surgeon.engine.generate import Decoder, greedy
from surgeon.engine.stats import InputStats, StatsHooks
from surgeon.engine.store import HiddenStore, Spilled, SpillStore

__all__ = [
    "Block",
    "Decoder",
    "Engine",
    "HeadOutput",
    "HiddenStore",
    "InputStats",
    "MicroBatch",
    "SpillStore",
    "Spilled",
    "StatsHooks",
    "from_context",
    "greedy",
]


def from_context(graph, ctx, **kw) -> Engine:
    """An engine on ``ctx``'s device with the run's roles, memory budget and spill folder."""
    from surgeon.engine import dist
    from surgeon.outputs import parse_size

    dist.setup(ctx.device)
    roles_fn = getattr(ctx, "roles", None)
    if callable(roles_fn) and "roles" not in kw:
        from surgeon.arch import LayerCountError
        from surgeon.errors import SurgeonError

        try:
            kw["roles"] = roles_fn(graph)
        except LayerCountError:
            raise
        except SurgeonError as e:
            raise SurgeonError(f"engine: cannot find the decoder blocks of this model: {e}") from None
    mm = getattr(ctx, "max_memory", None)
    if mm is not None and "max_memory" not in kw:
        kw["max_memory"] = parse_size(mm, flag="--max-memory") if isinstance(mm, str) else int(mm)
    kw.setdefault("spill_dir", getattr(ctx, "work_dir", None))
    kw.setdefault("check_finite", not getattr(ctx, "allow_nonfinite", False))
    return Engine(graph, device=ctx.device, **kw)
