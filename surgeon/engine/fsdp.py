"""FSDP2 for end-to-end training (PERP's full mode) when several processes run (``torchrun``; gloo on CPU, NCCL on
CUDA): each decoder block and the root module are sharded with ``torch.distributed.fsdp.fully_shard``, every
rank trains on its slice of each batch, and FSDP2's reduce-scatter averages the gradients, so a step equals the
one-process step on the whole batch (equal slices). One process: nothing changes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from surgeon.engine import dist

if TYPE_CHECKING:
    from torch import nn


def shard_for_training(model: nn.Module, block_prefixes: Sequence[str], device: str | torch.device = "cpu") -> bool:
    """Shard ``model`` (its decoder blocks, found from their tensor-name prefixes, then the root) over the
    ``torchrun`` processes; False (and no change) in a single process. Parameters keep their ``requires_grad``
    (FSDP2 allows frozen and trained ones in one unit): collect the trained ones *after* this call."""
    dist.setup(str(device))
    if not dist.active() or dist.world() < 2:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from surgeon.engine.core import layer_path

    mesh = init_device_mesh(torch.device(device).type, (dist.world(),))
    for prefix in block_prefixes:
        fully_shard(model.get_submodule(layer_path(model, prefix)), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return True


def rank_slice(indices: list[int]) -> list[int]:
    """This rank's share of a batch's sample indices (all of them in one process)."""
    return indices[dist.rank()::dist.world()] if dist.active() else indices


def gather_full(model: nn.Module) -> None:
    """All-gather every sharded unit of ``model`` so its parameters are whole tensors again (before merging
    adapters or reading trained values); no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter, or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
