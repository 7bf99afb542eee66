"""How a family's forward post-processes the output head's logits (soft-capping, scaling), for the engine's
chunked head (see :mod:`surgeon.engine.core`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from surgeon.errors import SurgeonError


def _value(config: dict[str, Any], key: str) -> Any:
    for src in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        if src.get(key) is not None:
            return src[key]
    return None


def _softcap(c: float) -> Callable:
    import torch

    return lambda x: torch.tanh(x / c) * c


#: config key -> the transform it configures (transformers' own code per family)
LOGIT_TRANSFORMS: dict[str, Callable[[float], Callable]] = {
    "final_logit_softcapping": _softcap,  # gemma2/3
    "logit_scale": lambda c: (lambda x: x * c),  # cohere
    "logits_scaling": lambda c: (lambda x: x / c),  # granite
}
UNSUPPORTED = ("output_multiplier_scale",)


def logit_transform(config: dict[str, Any]) -> Callable | None:
    """The function a family's forward applies to the head's logits, or None. A key we do not know how to apply
    is refused rather than ignored."""
    fns = []
    for key in (*LOGIT_TRANSFORMS, *UNSUPPORTED):
        value = _value(config, key)
        if value is None or value in (1, 1.0):
            continue
        if key not in LOGIT_TRANSFORMS:
            raise SurgeonError(f"config {key}={value}: the engine does not know how this family transforms logits")
        fns.append(LOGIT_TRANSFORMS[key](value))
    if not fns:
        return None

    def apply(x):
        for f in fns:
            x = f(x)
        return x

    return apply
