"""Per-layer parameter values of merges: parsing (CLI text, ``@file``), layer indices, mergekit-style gradients
over layers, ``{pattern: value}`` lookups, and per-model overrides (mergekit's per-model parameters).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

from pydantic import Field

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.graph import Graph

#: a scalar, a list over layers (interpolated like mergekit's gradients when its length differs from the
#: number of layers), or ``{pattern: value}`` (``re:<regex>`` full-match, else substring; ``default`` last).
LayerValue = Union[float, list[float], dict[str, float | list[float]]]  # noqa: UP007 (a runtime alias pydantic reads)


def parse_layer_value(v: Any) -> Any:
    """CLI text -> LayerValue: ``0.5``, ``0.1,0.5,0.9``, ``{"mlp": 0.3, "default": 0.5}`` or ``@file.yaml``."""
    if not isinstance(v, str):
        return v
    text = v.strip()
    if text.startswith("@"):
        # a validator runs before the op has its Context; a bare one reads the file as ``ctx.read_text`` does
        from surgeon.context import Context

        try:
            text = Context().read_text(text[1:], what=text)
        except SurgeonError as e:
            raise ValueError(str(e)) from None
    if text.startswith(("{", "[")) or ":" in text or "\n" in text:
        import yaml

        return yaml.safe_load(text)
    if "," in text:
        return [float(x) for x in text.split(",") if x.strip()]
    return float(text)


def parse_float_list(v: Any) -> Any:
    if isinstance(v, str):
        return [float(x) for x in v.split(",") if x.strip()]
    if isinstance(v, (int, float)):
        return [float(v)]
    return v


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name) or _ANY_INDEX.search(name)
    return int(m.group(1)) if m else None


def num_layers(g: Graph) -> int:
    n = g.config.get("num_hidden_layers") or g.config.get("n_layer") or g.config.get("num_layers")
    if isinstance(n, int) and n > 0:
        return n
    idx = [i for i in (layer_index(t) for t in g.names()) if i is not None]
    return max(idx) + 1 if idx else 1


def _gradient(values: Sequence[float], pos: float) -> float:
    if len(values) == 1:
        return float(values[0])
    x = pos * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    f = x - i
    return float(values[i] * (1 - f) + values[i + 1] * f)


def layer_value(value: Any, name: str, n_layers: int, *, embeddings: set[str] | None = None) -> float:
    """Resolve a :data:`LayerValue` for one tensor.

    A list of length ``n_layers`` gives one value per layer; another length is a gradient interpolated over the
    layers (mergekit semantics). Tensors outside the layers (embeddings, final norm, LM head) take the first value:
    mergekit 0.1.5 plans them at gradient position t = 0 (``MergePlanner.plan_module``), measured on a tiny Llama
    (``weight: [0, 1]`` gives lm_head and model.norm weight 0). ``embeddings`` is accepted for compatibility and
    unused.
    A dict is searched in order: keys ``re:<regex>`` full-match the tensor name, other keys match as substrings,
    ``default``/``*`` match everything; the first hit wins; its value may itself be a list.
    """
    if isinstance(value, dict):
        chosen = None
        for key, v in value.items():
            if key in ("default", "*"):
                continue
            if key.startswith("re:"):
                if re.fullmatch(key[3:], name):
                    chosen = v
                    break
            elif key in name:
                chosen = v
                break
        if chosen is None:
            chosen = value.get("default", value.get("*"))
        if chosen is None:
            raise SurgeonError(f"tensor {name!r}: no pattern of {sorted(value)} matches and no 'default' is given")
        return layer_value(chosen, name, n_layers, embeddings=embeddings)
    if isinstance(value, (list, tuple)):
        if not value:
            raise SurgeonError("an empty list is not a valid per-layer value")
        i = layer_index(name)
        if i is None:
            return float(value[0])
        if len(value) == n_layers:
            return float(value[min(i, n_layers - 1)])
        return _gradient(value, i / max(1, n_layers - 1))
    return float(value)



def per_model_field():
    return Field(default_factory=dict, description=(
        "Per-model overrides, as mergekit's per-model parameters: {model: {weight: [0, 1], density: 0.3}}; "
        "values may be per-layer lists or {pattern: value}. Keys: a model's name or folder name."))


def resolve_per_model(per_model: dict[str, dict[str, Any]], names: Sequence[str], allowed: Sequence[str], *,
                      op: str) -> dict[str, dict[str, Any]]:
    """``per_model`` with keys resolved to input names; unknown models or parameters fail naming them."""
    out = {}
    for key, values in per_model.items():
        name = resolve_model_key(key, names, what=f"{op}: per_model")
        for k in values:
            if k not in allowed:
                raise SurgeonError(f"{op}: per_model[{key!r}] has unknown key {k!r} (allowed: {', '.join(allowed)})")
        out[name] = dict(values)
    return out


def model_values(per_model: dict[str, dict[str, Any]], field: str, names: Sequence[str], tensor: str,
                 n_layers: int, shared: Any) -> list[float]:
    """One value of ``field`` per model for ``tensor``: the model's override, else ``shared`` (for ``weight``,
    ``shared`` is the list of per-model weights)."""
    out = []
    for i, n in enumerate(names):
        default = shared[i] if field == "weight" else shared
        out.append(layer_value(per_model.get(n, {}).get(field, default), tensor, n_layers))
    return out


def resolve_model_key(key: str, names: Sequence[str], *, what: str) -> str:
    """The input model a user-written ``key`` refers to: an exact name, else the one whose folder name is ``key``."""
    if key in names:
        return key
    from pathlib import PurePath

    hits = [n for n in names if PurePath(n).name == key or PurePath(n.rstrip("/")).name == key]
    if len(hits) == 1:
        return hits[0]
    raise SurgeonError(f"{what}: {key!r} is not one of the input models (have: {', '.join(names)})")

