"""Layouts of damaged checkpoints: the layers of a model some of whose layer tensors are missing (a lost
pipeline stage, for CheckFree recovery)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from surgeon.errors import SurgeonError

from . import Roles, _cfg, roles_for

_NUMBERED = re.compile(r"^(?P<head>(?:.*\.)?)(?P<i>\d+)\.(?P<tail>.+)$")


@dataclass
class GappedLayers:
    """The layers of a checkpoint some of whose layer tensors are missing (see :func:`roles_with_gaps`)."""

    roles: Roles  # resolved as if every layer were complete
    template: str  # layer prefix with {i}
    suffixes: list[str]  # layer-relative names of a complete layer, in order
    present: list[set[str]]  # suffixes present per layer

    def global_name(self, role: str) -> str | None:
        """The tensor of a global role (``embed``, ``lm_head``, ``final_norm``, ``pos_embed``): the one in the
        checkpoint, else the family's first name for it (the tensor may be missing)."""
        found = getattr(self.roles, role)
        if found is None:
            pattern = self.roles.layout.get(role)
            found = (pattern[0] if isinstance(pattern, list) else pattern) or None
        return found


def roles_with_gaps(config: dict[str, Any], names: list[str], overrides: dict[str, Any] | None = None
                    ) -> GappedLayers:
    """Roles of a checkpoint whose layers may have lost tensors (a lost pipeline stage). :func:`roles_for` needs
    every layer, so the numbering is read from the names (the numbered prefix holding the most tensors, e.g.
    ``model.layers.``), each layer's missing names are filled in from the most complete layer, and
    :func:`roles_for` resolves the rest."""
    by_head: dict[str, dict[int, list[str]]] = {}
    for n in names:
        m = _NUMBERED.match(n)
        if m:
            by_head.setdefault(m["head"], {}).setdefault(int(m["i"]), []).append(m["tail"])
    if not by_head:
        raise SurgeonError("no numbered layers found in the checkpoint")
    head = max(by_head, key=lambda h: sum(len(v) for v in by_head[h].values()))
    given = str((overrides or {}).get("layers", ""))
    if given.endswith("{i}.") and given[: -len("{i}.")] in by_head:  # the recipe's `arch: {layers: ...}`
        head = given[: -len("{i}.")]
    layers = by_head[head]
    n_cfg = _cfg(config or {}, "num_hidden_layers", "n_layer", "num_layers")
    n_layers = int(n_cfg) if isinstance(n_cfg, int) else max(layers) + 1
    if max(layers) >= n_layers:
        raise SurgeonError(f"tensors exist for layer {max(layers)} but config says {n_layers} layers")
    complete = max(layers.values(), key=len)
    template = head + "{i}."
    full = [n for n in names if not (m := _NUMBERED.match(n)) or m["head"] != head]
    full += [template.format(i=i) + s for i in range(n_layers) for s in complete]
    return GappedLayers(roles_for(config, full, overrides), template, list(complete),
                        [set(layers.get(i, [])) for i in range(n_layers)])
