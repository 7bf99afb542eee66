"""Keep the knowledge edits of an earlier step through pruning (issue #22 item 5).

An edit step records, per edited tensor, ΔW = up·down and the edit keys K (:mod:`surgeon.edits`): the edited
layer maps each key k_i to its new value v_i = W k_i. Pruning the edited matrix by |W| drops part of W, so W k_i
moves and the edited fact with it. Two protections, both leaving the sparsity exactly as without protection:

- ``refit`` (default): prune as usual, then shift each row's kept weights by the minimum-norm correction that
  restores the row's outputs on K (:func:`refit_kept`; an n×n solve per row, n = number of edits). The pruned
  layer maps every edited key to exactly the value it had before pruning. Without recorded keys (an edit op that
  does not record them) the rows of ``down`` stand in for K.
- ``entries``: the top ``fraction`` of |ΔW| of the edited matrix rank above every other weight (score +∞), so other
  small weights of the same matrix go instead (:func:`protect_score`, :func:`prune_smallest`).

Matrices without an edit are pruned as before. A new pruner (e.g. SparseGPT) calls :func:`plan_protection`, ranks
``Protection.rank_mask(name)`` entries last (or :func:`restore_protected` where it cannot) and passes its result
through ``Protection.finish``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from surgeon.edits import edit_deltas, edit_keys, resolve_protect

if TYPE_CHECKING:
    from surgeon.graph import Graph

PROTECT_HELP = ("Keep the knowledge edits made earlier in the same run (see protect_mode). Default: on when the "
                "run contains an edit step, off otherwise.")
MODE_HELP = ("How edits are kept: refit = after pruning, shift the kept weights of each row of an edited matrix "
             "(minimum-norm) so that it maps the edit keys to the same outputs as before (exact sparsity); "
             "entries = never prune the top protect_fraction of |ΔW| (exact sparsity: other small weights go "
             "instead); both.")
FRACTION_HELP = "entries/both mode: share of an edited matrix's entries kept for its edit (largest |ΔW| first)."
ProtectMode = Literal["refit", "entries", "both"]


@dataclass(frozen=True)
class Protection:
    """What a pruning op keeps for the edits in its selection: ranking masks (entries mode) and keys (refit)."""

    mode: str
    entries: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> protected-entry mask (storage)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [d_in, n] edit keys

    def rank_mask(self, name: str) -> torch.Tensor | None:
        """Entries ``name``'s pruner must rank last (None: rank as usual)."""
        return self.entries.get(name)

    def finish(self, name: str, pruned: torch.Tensor, dense: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The pruned tensor with the edit refitted on its kept entries (refit/both), else unchanged."""
        k = self.keys.get(name)
        return pruned if k is None else refit_kept(pruned, dense, k, transposed=transposed)

    def facts(self, fraction: float) -> dict[str, Any]:
        names = sorted(set(self.entries) | set(self.keys))
        if not names:
            return {"protect_edits": False}
        out: dict[str, Any] = {"protect_edits": True, "protect_mode": self.mode, "protected_tensors": names}
        if self.entries:
            out.update(protect_fraction=fraction, protected_entries={n: int(m.sum()) for n, m in self.entries.items()})
        if self.keys:
            out["refit_keys"] = {n: int(k.shape[1]) for n, k in self.keys.items()}
        return out


def plan_protection(graph: Graph, names: Sequence[str], option: bool | None, mode: str, fraction: float
                    ) -> Protection:
    """The protection of the selected tensors that carry a recorded edit (nothing when the option, resolved by
    :func:`surgeon.edits.resolve_protect`, is off)."""
    if not resolve_protect(option, graph):
        return Protection(mode)
    wanted = set(names)
    entries = {} if mode == "refit" or fraction <= 0 else \
        {n: protected_entries(d, fraction) for n, d in edit_deltas(graph).items() if n in wanted}
    keys = {} if mode == "entries" else {n: k for n, k in edit_keys(graph).items() if n in wanted}
    return Protection(mode, entries, keys)


def protected_entries(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (storage layout) of the ⌈fraction·numel⌉ largest |ΔW| entries (ties: lower flat index)."""
    k = min(delta.numel(), math.ceil(fraction * delta.numel() - 1e-9))
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=True).indices[:k]
        mask[order] = True
    return mask.reshape(delta.shape)


def refit_kept(pruned: torch.Tensor, dense: torch.Tensor, keys: torch.Tensor, *, transposed: bool = False,
               ridge: float = 1e-6) -> torch.Tensor:
    """``pruned`` with each output row's kept (non-zero) entries shifted by the minimum-norm correction that makes
    the row's outputs on the edit ``keys`` [d_in, n] equal the dense row's: for row r with kept set S_r,
    δ_r = K_S (K_Sᵀ K_S + εI)⁻¹ (w_r − ŵ_r)ᵀK, ε = ridge·mean diag(KᵀK). Pruned entries stay zero, so the sparsity
    is unchanged; Ŵ·K = W·K (up to ε): the edited layer still maps each edited key to its new value. fp32 out."""
    p = (pruned.T if transposed else pruned).double()
    d = (dense.T if transposed else dense).double()
    k = keys.double().to(p.device)
    kept = (p != 0).double()
    residual = (d - p) @ k  # [out, n]
    n = k.shape[1]
    gram = (kept @ (k[:, :, None] * k[:, None, :]).reshape(k.shape[0], n * n)).reshape(-1, n, n)
    eps = ridge * float((k * k).sum(0).mean())
    gram = gram + eps * torch.eye(n, dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram, residual.unsqueeze(-1)).squeeze(-1)  # [out, n]
    out = (p + kept * (coef @ k.T)).float()
    return (out.T if transposed else out).contiguous()


def protect_score(score: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    """``score`` with protected entries raised to +∞ (ranked last for pruning)."""
    if protected is None:
        return score
    return score.float().masked_fill(protected.to(score.device), math.inf)


def prune_smallest(w: torch.Tensor, k: int, protected: torch.Tensor) -> torch.Tensor:
    """``w`` (fp32) with its ``k`` smallest |w| zeroed, protected entries ranked last (ties: lower flat index)."""
    wf = w.float()
    score = protect_score(wf.abs(), protected).reshape(-1)
    idx = torch.sort(score, stable=True).indices[:k]
    out = wf.reshape(-1).clone()
    out[idx] = 0
    return out.reshape(w.shape)


def restore_protected(pruned: torch.Tensor, dense: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    """Protected entries put back from ``dense`` after a pruner that cannot rank them last (global threshold);
    sparsity then falls short by at most the protected count."""
    if protected is None:
        return pruned
    return torch.where(protected.to(pruned.device), dense.float().to(pruned.device), pruned)
