"""Surgeon's model types on disk: the packed ShiftAdd and compact recursive outputs carry ``model_type``
``surgeon_shiftadd`` / ``surgeon_recursive`` in ``config.json`` (the architecture's own type under
``surgeon_base_model_type``), so that transformers without surgeon refuses them instead of loading random weights.
Inside surgeon the config has the base type back: :func:`from_disk` / :func:`to_disk` are the only two places that
know the difference. Light: imported by the checkpoint reader and the writer (see :mod:`surgeon.formats.hf` for
the transformers registration).
"""
from __future__ import annotations

from typing import Any

SHIFTADD_MODEL_TYPE = "surgeon_shiftadd"
RECURSIVE_MODEL_TYPE = "surgeon_recursive"
BASE_TYPE_KEY = "surgeon_base_model_type"
SHIFTADD_QUANT_METHOD = "shiftadd"
RECURSION_KEY = "recursion"  # config key of the compact recursive layout
SURGEON_MODEL_TYPES = (SHIFTADD_MODEL_TYPE, RECURSIVE_MODEL_TYPE)


def is_shiftadd_packed(config: dict[str, Any]) -> bool:
    """True when ``config`` (in memory form) describes a ShiftAdd-packed checkpoint."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == SHIFTADD_QUANT_METHOD


def surgeon_model_type(config: dict[str, Any]) -> str | None:
    """The surgeon model type a config (in memory form) must carry on disk, or None for a plain layout."""
    if is_shiftadd_packed(config):
        return SHIFTADD_MODEL_TYPE
    if isinstance(config.get(RECURSION_KEY), dict):
        return RECURSIVE_MODEL_TYPE
    return None


def to_disk(config: dict[str, Any]) -> dict[str, Any]:
    """The root ``config.json`` as written: a surgeon model type where the layout needs surgeon to load."""
    kind = surgeon_model_type(config)
    if kind is None or config.get("model_type") == kind:
        return config
    out = dict(config)
    out[BASE_TYPE_KEY] = config.get("model_type")
    out["model_type"] = kind
    return out


def from_disk(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The config as surgeon uses it: the architecture's own ``model_type`` back (inverse of :func:`to_disk`)."""
    if not config or config.get("model_type") not in SURGEON_MODEL_TYPES:
        return config
    out = dict(config)
    base = out.pop(BASE_TYPE_KEY, None)
    if base is None:
        del out["model_type"]
    else:
        out["model_type"] = base
    return out
