"""Surgeon's own checkpoint formats: readers, dense views and writer-side layouts that the framework and the ops
share (ops import these, never each other's internals).

- :mod:`surgeon.formats.model_types`: the on-disk model types (``surgeon_shiftadd`` / ``surgeon_recursive``),
  ``to_disk`` / ``from_disk`` (light: the checkpoint reader and the writer import it);
- :mod:`surgeon.formats.hf`: their registration with transformers' Auto classes;
- :mod:`surgeon.formats.shiftadd`: the packed ShiftAdd layout, :func:`load_shiftadd`, :func:`dense_view`;
- :mod:`surgeon.formats.recursive`: the compact recursive layout of ``surgeon tie``, :func:`load_recursive`,
  the PEFT adapter files.
"""
from __future__ import annotations

from surgeon.formats.model_types import (
    BASE_TYPE_KEY,
    RECURSIVE_MODEL_TYPE,
    SHIFTADD_MODEL_TYPE,
    SURGEON_MODEL_TYPES,
    from_disk,
    surgeon_model_type,
    to_disk,
)

__all__ = [
    "BASE_TYPE_KEY",
    "RECURSIVE_MODEL_TYPE",
    "SHIFTADD_MODEL_TYPE",
    "SURGEON_MODEL_TYPES",
    "dense_view",
    "from_disk",
    "install_transformers_hook",
    "load_recursive",
    "load_shiftadd",
    "surgeon_model_type",
    "to_disk",
]

_LAZY = {"load_shiftadd": "surgeon.formats.shiftadd", "dense_view": "surgeon.formats.shiftadd",
         "load_recursive": "surgeon.formats.recursive", "install_transformers_hook": "surgeon.formats.hf"}


def __getattr__(name: str):  # readers (torch) and the registration load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
