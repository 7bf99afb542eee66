"""Sparsity-preserving adapters of PERP (Zimmer et al., arXiv 2312.15230; ``ZIB-IOL/PERP`` ``peft_methods.py``).

Both act on the *stored* weight (whatever its orientation: Linear [out, in] or Conv1D [in, out]) through a
``torch.nn.utils.parametrize`` parametrization, so the wrapped module's own forward is unchanged:

- MaskLoRA: W' = W + s·(M ⊙ B A), M = 1[W ≠ 0], s = α / r; B starts at zero, A Kaiming-uniform (as LoRA).
- ScaleLoRA: W' = W ⊙ (B A), A and B all 1/√r so B A = 1 at the start (identity); no α.
- PlainLoRA (the reference's classical LoRA on the unpruned ``lm_head``): W' = W + s·B A, s = α / r, initialised
  as MaskLoRA; dense, so it is only for tensors that were not pruned.

Both leave W' = 0 wherever W = 0, so the merge (W' computed in fp32, cast to the stored dtype) is exact and the
mask survives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


class MaskLoRA(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        rows, cols = weight.shape
        # bool, not the weight's dtype: a quarter of the memory of an fp32 mask (SmolLM2-135M: 106 MB, not 424 MB)
        self.register_buffer("mask", weight != 0, persistent=False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        ba = self.lora_B @ self.lora_A
        return torch.where(self.mask, self.scale * ba, ba.new_zeros(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta()


class PlainLoRA(MaskLoRA):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__(weight, rank, alpha)
        self.mask = None  # no mask: the delta is dense

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)


class ScaleLoRA(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float = 0.0):
        super().__init__()
        rows, cols = weight.shape
        v = 1 / math.sqrt(rank)
        self.lora_A = nn.Parameter(torch.full((rank, cols), v, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.full((rows, rank), v, dtype=weight.dtype, device=weight.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (self.lora_B @ self.lora_A)


ADAPTERS = {"mask": MaskLoRA, "scale": ScaleLoRA, "plain": PlainLoRA}


@dataclass
class Attached:
    module: nn.Module
    leaf: str
    adapter: nn.Module


def attach(module: nn.Module, leaf: str, kind: str, rank: int, alpha: float) -> Attached:
    """Parametrize ``module.<leaf>`` with a fresh adapter; the original weight is frozen."""
    w = getattr(module, leaf)
    adapter = ADAPTERS[kind](w.detach(), rank, alpha)
    parametrize.register_parametrization(module, leaf, adapter)
    module.parametrizations[leaf].original.requires_grad_(False)
    return Attached(module, leaf, adapter)


def merged_weight(a: Attached) -> torch.Tensor:
    """W' in fp32 from the frozen original and the trained adapter."""
    with torch.no_grad():
        w = a.module.parametrizations[a.leaf].original.float()
        ad = a.adapter
        if isinstance(ad, PlainLoRA):
            return w + ad.scale * (ad.lora_B.float() @ ad.lora_A.float())
        if isinstance(ad, MaskLoRA):
            return w + ad.scale * (ad.lora_B.float() @ ad.lora_A.float()) * (w != 0)
        return w * (ad.lora_B.float() @ ad.lora_A.float())


def detach(a: Attached, weight: torch.Tensor | None = None) -> None:
    """Remove the parametrization, leaving ``weight`` (default: the original) as a plain parameter."""
    orig = a.module.parametrizations[a.leaf].original
    parametrize.remove_parametrizations(a.module, a.leaf, leave_parametrized=False)
    p = getattr(a.module, a.leaf)
    with torch.no_grad():
        if weight is not None:
            p.copy_(weight.to(p.dtype))
    p.requires_grad_(orig.requires_grad)
