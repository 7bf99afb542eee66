"""Where the engine keeps what does not fit in memory: hidden states past a budget, and changed tensors.

:class:`HiddenStore` holds one tensor per micro-batch; once the bytes held pass ``budget`` the next ones go
to safetensors files in a temporary folder and are read back (memory-mapped) on demand.

:class:`SpillStore` writes tensors a model-level op produced (changed weights, masks) to safetensors files and
returns :class:`Spilled` nodes that read them lazily, so a chain of model-level steps holds no changed tensor in
RAM. Its folder is the run's work folder when the context names one, else a temporary folder removed at exit.
"""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from surgeon.graph import Node

_counter = itertools.count()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def temp_folder(prefix: str, parent: str | Path | None = None) -> Path:
    """A fresh folder (under ``parent`` when given) removed when the interpreter exits."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    atexit.register(shutil.rmtree, path, True)
    return path


class HiddenStore:
    """Per-micro-batch tensors in RAM up to ``budget`` bytes, on disk beyond (``budget=None``: never spill)."""

    def __init__(self, budget: int | None = None, folder: Path | None = None):
        self.budget = budget
        self.folder = folder
        self.items: list[torch.Tensor | Path] = []
        self.ram = 0
        self.spilled = 0  # bytes written to disk

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        if self.budget is None or self.ram + _nbytes(t) <= self.budget:
            self.items.append(t)
            self.ram += _nbytes(t)
            return
        from safetensors.torch import save_file

        if self.folder is None:
            self.folder = temp_folder("surgeon-hidden-")
        path = self.folder / f"h{next(_counter)}.safetensors"
        save_file({"h": t.to("cpu").contiguous()}, str(path))
        self.items.append(path)
        self.spilled += _nbytes(t)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int, device: torch.device | str = "cpu") -> torch.Tensor:
        item = self.items[i]
        if isinstance(item, Path):
            from safetensors import safe_open

            with safe_open(str(item), framework="pt") as f:
                return f.get_tensor("h").to(device)
        return item.to(device)

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.items, self.ram, self.spilled = [], 0, 0


class Spilled(Node):
    """A tensor an op computed, stored in one safetensors file; read (memory-mapped) when computed."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype, label: str = "spilled"):
        self.path, self.key = path, key
        self.shape, self.dtype, self.label = tuple(shape), dtype, label

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.key)


class SpillStore:
    """Writes tensors to ``folder`` (one file each) and hands back lazy :class:`Spilled` nodes."""

    def __init__(self, folder: str | Path | None = None):
        self._parent = folder
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = temp_folder("surgeon-spill-", self._parent)
        return self._folder

    def put(self, name: str, value: torch.Tensor, label: str = "spilled") -> Spilled:
        from safetensors.torch import save_file

        value = value.detach().to("cpu").contiguous()
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-120:]
        path = self.folder / f"{next(_counter):06d}-{safe}.safetensors"
        tmp = path.with_suffix(".partial")
        save_file({"t": value}, str(tmp))
        os.replace(tmp, path)
        return Spilled(path, "t", tuple(value.shape), value.dtype, label=label)
