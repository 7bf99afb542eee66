"""Where an edit goes: the MLP down-projection of one layer (ALGORITHMS.md §4.1), found through architecture
roles.

Default layer: the published ROME/EMMET layer for the family's reference depth, scaled to this model's depth
when it differs: ``L = round(n_layers · L_ref / n_ref)``, clipped to ``[0, n_layers − 1]``. Families without a
published layer (mistral, qwen2, gemma, phi3, opt, ...) use the Llama ratio 5/32 and say so in the log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgeon.errors import SurgeonError

#: family -> (reference depth, reference layer) for ROME/EMMET (§4.1): GPT-2 XL 17/48, GPT-J 5/28,
#: GPT-NeoX-20B 15/44, Llama-2-7B 5/32. Exact matches of the other GPT-2 sizes are in ``_EXACT``.
REFERENCE_LAYER: dict[str, tuple[int, int]] = {
    "gpt2": (48, 17),
    "gptj": (28, 5),
    "gpt_neox": (44, 15),
    "llama": (32, 5),
}
_EXACT: dict[tuple[str, int], int] = {("gpt2", 24): 8, ("gpt2", 36): 12, ("gpt2", 48): 17}
_FALLBACK = REFERENCE_LAYER["llama"]


def default_layer(family: str, n_layers: int) -> tuple[int, str]:
    """(layer, rule used) for a model of ``family`` with ``n_layers`` blocks."""
    if (family, n_layers) in _EXACT:
        return _EXACT[(family, n_layers)], f"published layer for {family} with {n_layers} layers"
    ref = REFERENCE_LAYER.get(family)
    known = ref is not None
    n_ref, l_ref = ref if ref is not None else _FALLBACK
    layer = min(max(round(n_layers * l_ref / n_ref), 0), n_layers - 1)
    src = family if known else f"llama (no published layer for {family})"
    return layer, f"round({n_layers}·{l_ref}/{n_ref}) from {src}"


@dataclass(frozen=True)
class EditSite:
    """The edited tensor: ``name`` in the graph, stored transposed (Conv1D) or not, and its sizes."""

    layer: int
    name: str  # graph tensor name, e.g. model.layers.5.mlp.down_proj.weight
    transposed: bool
    d_out: int  # rows of W in Linear orientation (d_model)
    d_k: int  # key size (d_ff)
    bias_name: str | None
    family: str
    rule: str  # how the layer was chosen
    n_layers: int = 0  # decoder layers of the model

    @property
    def module_path(self) -> str:
        return self.name.removesuffix(".weight")


def locate(graph: Any, layer: int | None, roles: Any) -> EditSite:
    """The MLP down-projection of ``layer`` (or of the family's default layer); ``roles`` from ``ctx.roles``."""
    n = roles.n_layers
    if layer is None:
        layer, rule = default_layer(roles.family, n)
    else:
        if not 0 <= layer < n:
            raise SurgeonError(f"--layer {layer}: the model has layers 0..{n - 1}")
        rule = "--layer"
    name = roles.tensor(layer, "mlp.down")
    transposed = bool(roles.transposed("mlp.down"))
    shape = graph[name].shape
    if len(shape) != 2:
        raise SurgeonError(f"{name}: expected a 2-D weight, got shape {list(shape)}")
    d_out, d_k = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    bias = name.removesuffix("weight") + "bias"
    return EditSite(layer, name, transposed, d_out, d_k, bias if bias in graph else None, roles.family, rule, n)
