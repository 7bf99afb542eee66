"""Data parallelism over samples with ``torch.distributed`` (launched by ``torchrun``: RANK / WORLD_SIZE).

Each rank runs its slice of the samples (``rank::world``) through the engine; statistics and head totals are
summed with :func:`all_reduce_` at block boundaries; only rank 0 writes (:func:`is_writer`). gloo on CPU, NCCL
on CUDA. In one process every function here is a no-op.
"""
from __future__ import annotations

import os

import torch


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (once); True when more than one rank runs."""
    import torch.distributed as td

    if not td.is_available() or _env_world() <= 1:
        return False
    if not td.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        td.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return td.get_world_size() > 1


def active() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    import torch.distributed as td

    return td.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as td

    return td.get_world_size() if active() else 1


def is_writer() -> bool:
    """True on the rank that writes outputs (rank 0, or the only process)."""
    if active():
        return rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over ranks."""
    if active():
        import torch.distributed as td

        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def gather_objects(obj):
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    import torch.distributed as td

    out = [None] * world()
    td.all_gather_object(out, obj)
    return out
