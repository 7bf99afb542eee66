"""surgeon: offline model surgery on checkpoints.

Heavy modules (torch, transformers) are imported lazily so that ``surgeon --help`` stays fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "SurgeonError", "open_checkpoint", "load_shiftadd", "load_recursive"]


def __getattr__(name: str):  # lazy public API
    if name == "SurgeonError":
        from surgeon.errors import SurgeonError

        return SurgeonError
    if name == "open_checkpoint":
        from surgeon.checkpoint import open_checkpoint

        return open_checkpoint
    if name == "load_shiftadd":
        from surgeon.ops.shiftadd import load_shiftadd

        return load_shiftadd
    if name == "load_recursive":
        from surgeon.ops.tie import load_recursive

        return load_recursive
    raise AttributeError(name)
