"""Edit metrics (ALGORITHMS.md §4.7), measured on the materialised model before and after an edit.

- **efficacy**: share of requests whose prompt now gives the new target a higher mean token log-probability
  than the old answer (CounterFact ES, teacher-forced);
- **efficacy_greedy**: share whose greedy continuation *is* the target (no teacher forcing; arXiv 2502.11177
  shows teacher forcing alone overstates success);
- **paraphrase** / **paraphrase_greedy**: the same on the requests' paraphrase prompts;
- **neighborhood**: share of neighbourhood prompts that still prefer their pre-edit answer over the new target
  (CounterFact NS); **neighborhood_unchanged**: share whose greedy answer is token-for-token unchanged;
- **perplexity** before/after on a held-out text (collapse proxy, arXiv 2402.09656).

The old answer is ``target_true`` when given, else the unedited model's greedy continuation of as many tokens
as the target has. Neighbour answers are the unedited model's greedy continuations.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .requests import Request
from .rows import pad_id_of, pad_rows, target_ids

BATCH_ROWS = 32


def answer_logprob(model: torch.nn.Module, tok: Any, prompts: Sequence[str], answers: Sequence[list[int]], *,
                   device: str) -> list[float]:
    """Mean token log-probability of each answer (ids) after its prompt, teacher-forced."""
    out: list[float] = []
    for s in range(0, len(prompts), BATCH_ROWS):
        ps, ans = prompts[s:s + BATCH_ROWS], answers[s:s + BATCH_ROWS]
        heads = [list(tok(p)["input_ids"]) for p in ps]
        ids, mask = pad_rows([h + a for h, a in zip(heads, ans)], pad_id_of(tok), device)
        with torch.no_grad():
            logp = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        for i, (h, a) in enumerate(zip(heads, ans)):
            pos = torch.arange(len(h) - 1, len(h) - 1 + len(a), device=logp.device)
            out.append(float(logp[i, pos, torch.tensor(a, device=logp.device)].mean()))
    return out


def greedy_ids(model: torch.nn.Module, tok: Any, prompts: Sequence[str], lengths: Sequence[int], *,
               device: str) -> list[list[int]]:
    """Greedy continuation of ``lengths[i]`` tokens for each prompt (right padding, positions from the start)."""
    out: list[list[int]] = []
    for s in range(0, len(prompts), BATCH_ROWS):
        rows = [list(tok(p)["input_ids"]) for p in prompts[s:s + BATCH_ROWS]]
        want = list(lengths[s:s + BATCH_ROWS])
        gen: list[list[int]] = [[] for _ in rows]
        for _ in range(max(want)):
            ids, mask = pad_rows([r + g for r, g in zip(rows, gen)], pad_id_of(tok), device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for i, (r, g) in enumerate(zip(rows, gen)):
                if len(g) < want[i]:
                    g.append(int(logits[i, len(r) + len(g) - 1].argmax()))
        out.extend(gen)
    return out


@dataclass
class Before:
    """What the unedited model answers (needed to judge the edited one)."""

    target: list[list[int]]  # new target ids per request
    old: list[list[int]]  # old answer ids per request
    neighbor_prompts: list[str] = field(default_factory=list)
    neighbor_owner: list[int] = field(default_factory=list)
    neighbor_old: list[list[int]] = field(default_factory=list)
    perplexity: float | None = None


def before_edit(model: torch.nn.Module, tok: Any, requests: Sequence[Request], *, device: str) -> Before:
    targets = [target_ids(tok, r.text, r.target) for r in requests]
    need = [i for i, r in enumerate(requests) if r.target_true is None]
    greedy = greedy_ids(model, tok, [requests[i].text for i in need], [len(targets[i]) for i in need], device=device)
    old: list[list[int]] = []
    g = iter(greedy)
    for r, t in zip(requests, targets):
        old.append(target_ids(tok, r.text, r.target_true) if r.target_true is not None else next(g))
    nb_prompts, nb_owner = [], []
    for i, r in enumerate(requests):
        for p in r.neighborhood:
            nb_prompts.append(p)
            nb_owner.append(i)
    nb_old = greedy_ids(model, tok, nb_prompts, [len(targets[i]) for i in nb_owner], device=device)
    return Before(targets, old, nb_prompts, nb_owner, nb_old)


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def after_edit(model: torch.nn.Module, tok: Any, requests: Sequence[Request], before: Before, *,
               device: str) -> dict[str, Any]:
    """Metrics of the edited model against what it answered before (fractions in [0, 1])."""
    prompts = [r.text for r in requests]
    lp_new = answer_logprob(model, tok, prompts, before.target, device=device)
    lp_old = answer_logprob(model, tok, prompts, before.old, device=device)
    greedy = greedy_ids(model, tok, prompts, [len(t) for t in before.target], device=device)
    metrics: dict[str, Any] = {
        "efficacy": _share([a > b for a, b, t, o in zip(lp_new, lp_old, before.target, before.old) if t != o]),
        "efficacy_greedy": _share([g == t for g, t in zip(greedy, before.target)]),
        "target_prob": round(sum(math.exp(x) for x in lp_new) / len(lp_new), 4),
    }
    para, para_owner = [], []
    for i, r in enumerate(requests):
        for p in r.paraphrase_texts():
            para.append(p)
            para_owner.append(i)
    if para:
        new_ids = [before.target[i] for i in para_owner]
        old_ids = [before.old[i] for i in para_owner]
        pn = answer_logprob(model, tok, para, new_ids, device=device)
        po = answer_logprob(model, tok, para, old_ids, device=device)
        pg = greedy_ids(model, tok, para, [len(t) for t in new_ids], device=device)
        metrics["paraphrase"] = _share([a > b for a, b, t, o in zip(pn, po, new_ids, old_ids) if t != o])
        metrics["paraphrase_greedy"] = _share([g == t for g, t in zip(pg, new_ids)])
    if before.neighbor_prompts:
        new_ids = [before.target[i] for i in before.neighbor_owner]
        nn_ = answer_logprob(model, tok, before.neighbor_prompts, new_ids, device=device)
        no = answer_logprob(model, tok, before.neighbor_prompts, before.neighbor_old, device=device)
        ng = greedy_ids(model, tok, before.neighbor_prompts, [len(t) for t in before.neighbor_old], device=device)
        metrics["neighborhood"] = _share([o > n for o, n, a, b in zip(no, nn_, before.neighbor_old, new_ids)
                                          if a != b])
        metrics["neighborhood_unchanged"] = _share([g == o for g, o in zip(ng, before.neighbor_old)])
    return metrics


def perplexity(model: torch.nn.Module, windows: torch.Tensor, *, device: str, batch: int = 8) -> float:
    """exp(mean next-token NLL) over token windows [n, T]."""
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def metrics_table(title: str, rows: dict[str, Any]):
    """A rich table of metric -> value (percentages for shares)."""
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows.items():
        if v is None:
            continue
        shown = f"{100 * v:.1f} %" if isinstance(v, float) and k not in ("target_prob",) and "perplexity" not in k \
            and 0 <= v <= 1 else (f"{v:.4g}" if isinstance(v, float) else str(v))
        table.add_row(k, shown)
    return table
