"""The edit requests of an earlier step as an extra retraining loss (issue #22 item 5).

L = L_LM + w · (1/n) Σ_i (1/|t_i|) Σ_j −log p(t_ij | prompt_i, t_i,<j): the mean teacher-forced negative
log-likelihood of each edited fact's target after its prompt — the value objective of ROME/EMMET (arXiv 2202.05262
eq. 4, without the KL and decay terms) evaluated on the whole retrained model. The requests come from the graph's
edit records (:mod:`surgeon.edits`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError


@dataclass(frozen=True)
class EditBatch:
    """Right-padded prompt+target rows and, per row, the positions whose next token is a target token."""

    ids: torch.Tensor  # [n, L]
    attention: torch.Tensor  # [n, L]
    rows: torch.Tensor  # [m] row of each target token
    positions: torch.Tensor  # [m] position predicting it (the token before it)
    targets: torch.Tensor  # [m] its id
    weights: torch.Tensor  # [m] 1 / (n · |t_i|)


def split_ids(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the target's continuation ids: ids(prompt + target) minus ids(prompt) when that is a
    prefix (word boundaries as the model sees them), else the target tokenised alone; a trailing EOS dropped."""
    p = list(tok(prompt)["input_ids"])
    full = list(tok(prompt + target)["input_ids"])
    t = full[len(p):] if full[: len(p)] == p and len(full) > len(p) else \
        list(tok(target, add_special_tokens=False)["input_ids"])
    eos = getattr(tok, "eos_token_id", None)
    if eos is not None and len(t) > 1 and t[-1] == eos:
        t = t[:-1]
    if not t:
        raise SurgeonError(f"edit loss: target {target!r} of {prompt!r} has no tokens")
    return p, t


def edit_batch(tok, requests: Sequence[dict[str, Any]]) -> EditBatch:
    """One padded batch of every request's prompt + target."""
    if not requests:
        raise SurgeonError("edit loss: no edit requests")
    pairs = [split_ids(tok, r["prompt"], r["target"]) for r in requests]
    length = max(len(p) + len(t) for p, t in pairs)
    pad = getattr(tok, "pad_token_id", None) or 0
    ids = torch.full((len(pairs), length), pad, dtype=torch.long)
    att = torch.zeros((len(pairs), length), dtype=torch.long)
    rows, pos, tgt, wts = [], [], [], []
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        att[i, : len(p) + len(t)] = 1
        for j, tid in enumerate(t):
            rows.append(i)
            pos.append(len(p) - 1 + j)
            tgt.append(tid)
            wts.append(1.0 / (len(pairs) * len(t)))
    return EditBatch(ids, att, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt), torch.tensor(wts))


def edit_nll(model: nn.Module, batch: EditBatch) -> torch.Tensor:
    """The mean over requests of the mean target-token NLL (a scalar with grad)."""
    dev = next(model.parameters()).device
    logits = model(input_ids=batch.ids.to(dev), attention_mask=batch.attention.to(dev), use_cache=False).logits
    picked = logits[batch.rows.to(dev), batch.positions.to(dev)].float()
    logp = torch.log_softmax(picked, dim=-1).gather(1, batch.targets.to(dev)[:, None])[:, 0]
    return -(logp * batch.weights.to(dev)).sum()


def unique_requests(requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests without repeats of the same (prompt, target) (a MEMIT edit records them per layer)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in requests:
        key = (r["prompt"].replace("{}", r.get("subject", "{}")), r["target"])
        if key not in seen:
            seen.add(key)
            out.append({**r, "prompt": key[0]})
    return out


def edit_term(graph, option: bool | None, weight: float, ctx, facts: dict[str, Any]):
    """``model -> weight · edit NLL`` for PERP when the option (default: the graph carries edit records) is on,
    else None; records what it did in ``facts``."""
    from surgeon.edits import edit_requests, resolve_protect

    if not resolve_protect(option, graph):
        facts["edit_loss"] = False
        return None
    requests = unique_requests(edit_requests(graph))
    if not requests:
        raise SurgeonError("retrain.perp edit_loss: on, but no edit step earlier in this run recorded requests")
    batch = edit_batch(ctx.tokenizer(graph), requests)
    facts.update(edit_loss=True, edit_loss_weight=weight, edit_requests=len(requests))
    return lambda model: weight * edit_nll(model, batch)
