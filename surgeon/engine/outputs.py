"""Per-sample outputs of the engine's last block, for a distillation teacher (``retrain.distill``).

:func:`last_hidden` runs every block once over the samples and keeps the last block's outputs (in a
:class:`~surgeon.engine.store.HiddenStore`, so past the budget they sit on disk); :meth:`LastHidden.logits` applies
the head (final norm, output embedding in chunks, logit transform: :meth:`Engine.logits`) to any samples later,
one training batch at a time. :func:`block_states` keeps every block's inputs and the last block's outputs (the
targets of a block-wise stage). :func:`top_logits` keeps only the k largest logits per position, merging the
top k of each :data:`~surgeon.engine.core.VOCAB_CHUNK`-row slice of the output embedding, so no ``[rows, V]``
tensor exists. Neither builds the whole model: one block is resident during the pass, the head after it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from surgeon.engine import dist
from surgeon.engine.core import Engine, MicroBatch
from surgeon.engine.store import HiddenStore
from surgeon.errors import SurgeonError


@dataclass
class LastHidden:
    """The last block's outputs per sample: ``where[i] = (micro-batch, row)`` in ``store``."""

    engine: Engine
    store: HiddenStore
    where: dict[int, tuple[int, int]]

    def rows(self, samples: Sequence[int]) -> torch.Tensor:
        """``[len(samples), L, d]`` hidden states on the engine's device (each micro-batch read once)."""
        got: dict[int, torch.Tensor] = {}
        for j in sorted({self.where[i][0] for i in samples}):
            h = self.store.get(j, self.engine.device)
            for i in samples:
                if self.where[i][0] == j:
                    got[i] = h[self.where[i][1]]
        return torch.stack([got[i] for i in samples])

    def logits(self, samples: Sequence[int], head: tuple[torch.Tensor, torch.Tensor | None] | None = None
               ) -> torch.Tensor:
        """fp32 logits ``[len(samples), L, V]`` of the model at every position of the given samples."""
        h = self.rows(samples)
        with torch.no_grad():
            return self.engine.logits(h.reshape(-1, h.shape[-1]), head).reshape(*h.shape[:2], -1)


def last_hidden(engine: Engine, samples, *, progress: Callable | None = None) -> LastHidden:
    """Run every block (unchanged) over ``samples`` and keep the last block's outputs per sample (one process:
    a teacher's outputs are needed for every sample, not a rank's slice)."""
    if dist.world() > 1:
        raise SurgeonError("engine: a teacher's last hidden states are kept in one process; run without torchrun")
    for _ in engine.blocks(samples, record=False, progress=progress):
        pass
    where = {gi: (j, k) for j, mb in enumerate(engine._batches) for k, gi in enumerate(mb.indices)}
    return LastHidden(engine, engine._hidden, where)


@dataclass
class BlockStates:
    """The hidden states at every block boundary, per micro-batch: boundary ``b`` is block ``b``'s input
    (``b = n_layers``: the last block's output) and ``batches[j].kwargs`` what the blocks received with them."""

    store: HiddenStore
    batches: list[MicroBatch]
    n_layers: int

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def get(self, boundary: int, j: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[b, L, d]`` states at ``boundary`` of micro-batch ``j``."""
        return self.store.get(boundary * self.n_batches + j, device)

    def clear(self) -> None:
        self.store.clear()


def block_states(engine: Engine, samples, *, progress: Callable | None = None) -> BlockStates:
    """Run every block (unchanged) over ``samples`` once, keeping each block's inputs and the last block's
    outputs (``(n_layers + 1) · n · L · d`` values: in RAM up to the engine's hidden-state budget, on disk
    beyond). One process, as :func:`last_hidden`."""
    if dist.world() > 1:
        raise SurgeonError("engine: a teacher's block states are kept in one process; run without torchrun")
    store = engine._new_store()
    for block in engine.blocks(samples, record=False, progress=progress):
        for _, h in block.inputs():
            store.append(h)
    for j in range(len(engine._batches)):
        store.append(engine._hidden.get(j))
    engine._hidden.clear()  # its spilled files; the tensors kept in RAM are now the new store's
    return BlockStates(store, list(engine._batches), engine.roles.n_layers)


def top_k_rows(engine: Engine, hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None], k: int,
               check: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits (fp32, descending) and their vocabulary ids of last-block rows ``hidden [n, d]``:
    :meth:`Engine.logit_slices`, each slice's top k merged into the running top k."""
    k = min(k, head[0].shape[0])
    best_v = torch.empty(hidden.shape[0], 0, device=hidden.device)
    best_i = torch.empty(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
    for v0, part in engine.logit_slices(hidden, head, check):
        v, i = torch.topk(part, min(k, part.shape[1]), dim=1)
        best_v, pick = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + v0], 1).gather(1, pick)
    return best_v, best_i


def top_logits(engine: Engine, samples, k: int, *, progress: Callable | None = None, rows_per_call: int = 1024
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample, the k largest logits at every position (``[L, k]`` fp32, descending) and their ids
    (``[L, k]`` int64), on the CPU: every block once, then the head ``rows_per_call`` positions at a time."""
    hidden = last_hidden(engine, samples, progress=progress)
    head = engine.head_weights()
    gname = engine._graph_of(engine._head_pname()) or "lm_head"
    values: dict[int, torch.Tensor] = {}
    indices: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for j, mb in enumerate(engine._batches):
            h = hidden.store.get(j, engine.device)
            flat = h.reshape(-1, h.shape[-1])
            parts = [top_k_rows(engine, flat[s:s + rows_per_call], head, k,
                                check=(lambda c: engine._check(gname, c)) if j == 0 and s == 0 else None)
                     for s in range(0, flat.shape[0], rows_per_call)]
            v = torch.cat([p[0] for p in parts]).cpu().reshape(h.shape[0], h.shape[1], -1)
            i = torch.cat([p[1] for p in parts]).cpu().reshape(h.shape[0], h.shape[1], -1)
            for r, gi in enumerate(mb.indices):
                values[gi], indices[gi] = v[r], i[r]
    hidden.store.clear()
    n = len(values)
    return [values[i] for i in range(n)], [indices[i] for i in range(n)]
