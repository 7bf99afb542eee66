"""Input statistics of linear modules, accumulated over every token the engine runs through a block.

One hook serves every op: ``sq_norm`` Σₜ x_tj² (Wanda's ‖X_j‖₂², arXiv 2306.11695 eq. 1), ``xtx`` Σₜ x_t x_tᵀ
(SparseGPT/GPTQ Hessians, calibrated ShiftAdd; for an MLP-out projection it is E[kkᵀ]·n of ROME/EMMET's keys,
arXiv 2202.05262 eq. 2), ``sum`` Σₜ x_t and ``count`` (tokens). Accumulation is in ``acc_dtype`` (fp64 by
default) on the block's device; :meth:`InputStats.all_reduce` sums them across data-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgeon.errors import SurgeonError

KINDS = ("sq_norm", "xtx", "sum", "count")
#: largest fp64 copy of a module input made at once (a 2048-token MLP-down input of width 14336 is 235 MB)
ACC_CHUNK_BYTES = 64 << 20


@dataclass
class InputStats:
    """Accumulators of one module's input ``x [tokens, width]``."""

    width: int
    kinds: tuple[str, ...]
    acc_dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    count: int = 0
    sq_norm: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    _extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise SurgeonError(f"engine: unknown statistic {bad[0]!r} (expected one of {', '.join(KINDS)})")
        z = {"dtype": self.acc_dtype, "device": self.device}
        if "sq_norm" in self.kinds:
            self.sq_norm = torch.zeros(self.width, **z)
        if "xtx" in self.kinds:
            self.xtx = torch.zeros(self.width, self.width, **z)
        if "sum" in self.kinds:
            self.sum = torch.zeros(self.width, **z)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[1] != self.width:
            raise SurgeonError(f"engine: module input has width {x.shape[1]}, expected {self.width}")
        self.count += x.shape[0]
        rows = max(1, ACC_CHUNK_BYTES // (self.width * self.acc_dtype.itemsize))
        for r0 in range(0, x.shape[0], rows):  # the accumulation-dtype copy of x is at most ACC_CHUNK_BYTES
            xc = x[r0:r0 + rows].to(self.acc_dtype)
            if self.sq_norm is not None:
                self.sq_norm += (xc * xc).sum(0)
            if self.xtx is not None:
                self.xtx.addmm_(xc.T, xc)  # in place: no [width, width] temporary (1.6 GB in fp64 at width 14336)
            if self.sum is not None:
                self.sum += xc.sum(0)

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks (no-op in one process)."""
        from surgeon.engine import dist

        if not dist.active():
            return
        for t in (self.sq_norm, self.xtx, self.sum):
            if t is not None:
                dist.all_reduce_(t)
        c = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        dist.all_reduce_(c)
        self.count = int(c.item())


def input_width(module: nn.Module, weight: torch.Tensor, transposed: bool = False) -> int:
    """Width of the input a linear-like module multiplies by ``weight`` (Conv1D stores ``[in, out]``)."""
    for attr in ("in_features", "nx"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    return int(weight.shape[0] if transposed else weight.shape[-1])


class StatsHooks:
    """Forward pre-hooks adding each watched module's first input to its :class:`InputStats`."""

    def __init__(self, watched: dict[str, tuple[nn.Module, InputStats]]):
        self.stats = {name: st for name, (_, st) in watched.items()}
        self.handles = [m.register_forward_pre_hook(self._hook(st)) for _, (m, st) in watched.items()]

    @staticmethod
    def _hook(st: InputStats):
        def hook(module: nn.Module, args: tuple) -> None:
            if args:
                st.add(args[0])

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
