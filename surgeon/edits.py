"""Edits made earlier in the same run, for later steps that should keep them (issue #22 item 5).

An edit op records, in ``graph.meta["edits"]``, which tensor it changed, the low-rank factors of the change
(ΔW = up @ down in Linear orientation [d_out, d_in]; ``transposed`` for Conv1D storage [d_in, d_out]) and the
requests (prompt → target) it wrote. ``Graph.copy`` carries the records, so pruning, quantisation and retraining
steps later in the same recipe can read them with :func:`edit_records` / :func:`edit_deltas`. Nothing is written
to disk here (the undo file is the edit op's own business).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from surgeon.graph import Graph

META_KEY = "edits"


@dataclass(frozen=True)
class EditRecord:
    """One edit step's change to one tensor, and what it was asked to write."""

    tensor: str
    up: torch.Tensor  # [d_out, r] fp32
    down: torch.Tensor  # [r, d_in] fp32
    transposed: bool
    requests: tuple[dict[str, Any], ...]  # {"prompt", "target", "subject", ...}
    op: str
    keys: torch.Tensor | None = None  # [d_in, n] fp32: the inputs the edit maps to its new values, when known

    def delta(self) -> torch.Tensor:
        """ΔW in the tensor's storage layout (fp32)."""
        d = self.up.double() @ self.down.double()
        return (d.T if self.transposed else d).float().contiguous()


def record_edit(graph: Graph, *, tensor: str, up: torch.Tensor, down: torch.Tensor, transposed: bool,
                requests: Sequence[dict[str, Any]], op: str, keys: torch.Tensor | None = None) -> None:
    """Append one edit record to ``graph.meta["edits"]`` (factors and keys copied to fp32 CPU)."""
    graph.meta.setdefault(META_KEY, []).append({
        "tensor": tensor, "up": up.detach().float().cpu().clone(), "down": down.detach().float().cpu().clone(),
        "transposed": bool(transposed), "requests": [dict(r) for r in requests], "op": op,
        "keys": None if keys is None else keys.detach().float().cpu().clone()})


def edit_records(graph: Graph) -> list[EditRecord]:
    """The edits recorded earlier in this run whose tensor is still in the graph, oldest first."""
    out = []
    for r in graph.meta.get(META_KEY, []):
        if r["tensor"] in graph:
            out.append(EditRecord(r["tensor"], r["up"], r["down"], r["transposed"], tuple(r["requests"]), r["op"],
                                  r.get("keys")))
    return out


def edit_keys(graph: Graph) -> dict[str, torch.Tensor]:
    """``{tensor: [d_in, N]}`` the directions whose outputs the recorded edits of that tensor set: the edit keys
    when the edit op recorded them, else the rows of ``down`` (the inputs ΔW responds to)."""
    out: dict[str, torch.Tensor] = {}
    for rec in edit_records(graph):
        k = rec.keys if rec.keys is not None else rec.down.T.contiguous()
        out[rec.tensor] = torch.cat([out[rec.tensor], k], 1) if rec.tensor in out else k
    return out


def has_edits(graph: Graph) -> bool:
    return bool(edit_records(graph))


def edit_deltas(graph: Graph) -> dict[str, torch.Tensor]:
    """``{tensor: ΣΔW}`` in storage layout over every recorded edit of that tensor."""
    out: dict[str, torch.Tensor] = {}
    for rec in edit_records(graph):
        d = rec.delta()
        out[rec.tensor] = out[rec.tensor] + d if rec.tensor in out else d
    return out


def edit_requests(graph: Graph) -> list[dict[str, Any]]:
    """Every recorded request (prompt, target, …), oldest first."""
    return [r for rec in edit_records(graph) for r in rec.requests]


def resolve_protect(option: bool | None, graph: Graph) -> bool:
    """An op's ``protect_edits``-style option: ``None`` means on exactly when the graph carries edit records."""
    return has_edits(graph) if option is None else bool(option)


def protected_tensors(graph: Graph, option: bool | None) -> set[str]:
    """Names of the tensors carrying recorded edits when protection (``option``, see :func:`resolve_protect`) is
    on; empty otherwise."""
    return {rec.tensor for rec in edit_records(graph)} if resolve_protect(option, graph) else set()
