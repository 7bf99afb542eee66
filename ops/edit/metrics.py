"""Edit metrics (ALGORITHMS.md §4.7), measured before and after an edit on the model engine (block by block:
``Engine.logits_at`` at the few answer positions, never a whole materialised model).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .requests import Request
from .rows import target_ids

#: ``score(rows, positions)``: fp32 logits ``[len(positions[i]), V]`` at the given positions of each token row
#: (the model engine's :meth:`surgeon.engine.Engine.logits_at`; never a whole materialised model)
Scorer = Callable[[Sequence[list[int]], Sequence[Sequence[int]]], list[torch.Tensor]]


class EngineScorer:
    """A :data:`Scorer` running ``graph`` block by block on the model engine (one pass per call), and the
    held-out perplexity on the same engine."""

    def __init__(self, graph: Any, ctx: Any):
        from surgeon import engine

        self.engine = engine.from_context(graph, ctx, dtype="float32", micro_batch=64, group_by_length=True)

    def __call__(self, rows: Sequence[list[int]], positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if not rows:
            return []
        return self.engine.logits_at([torch.tensor(r, dtype=torch.long) for r in rows], positions)

    def decode(self, prompts: torch.Tensor, steps: int, choose: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        """``[b, steps]`` tokens after ``prompts [b, L]`` (equal lengths), each chosen by ``choose`` from the fp32
        logits, on the engine's KV-cached :class:`surgeon.engine.Decoder` (blocks resident when they fit)."""
        from surgeon.engine import Decoder

        with Decoder(self.engine) as dec:
            return dec.decode(prompts, steps, choose)

    def perplexity(self, windows: torch.Tensor) -> float:
        """exp(mean next-token NLL) over token windows [n, T] (:func:`surgeon.metrics.engine_scores`)."""
        from surgeon.metrics import engine_scores

        return float(engine_scores(self.engine, windows, None, None)["perplexity"]["perplexity"])


def answer_logprob(score: Scorer, tok: Any, prompts: Sequence[str], answers: Sequence[list[int]]) -> list[float]:
    """Mean token log-probability of each answer (ids) after its prompt, teacher-forced (one engine pass)."""
    heads = [list(tok(p)["input_ids"]) for p in prompts]
    rows = [h + a for h, a in zip(heads, answers)]
    logits = score(rows, [range(len(h) - 1, len(h) - 1 + len(a)) for h, a in zip(heads, answers)])
    return [float(lg.log_softmax(-1)[torch.arange(len(a)), torch.tensor(a, dtype=torch.long)].mean())
            for lg, a in zip(logits, answers)]


def greedy_ids(score: Scorer, tok: Any, prompts: Sequence[str], lengths: Sequence[int]) -> list[list[int]]:
    """Greedy continuation of ``lengths[i]`` tokens for each prompt: one engine pass per generated token, the
    rows that still need one together."""
    rows = [list(tok(p)["input_ids"]) for p in prompts]
    gen: list[list[int]] = [[] for _ in rows]
    for _ in range(max(lengths, default=0)):
        live = [i for i, n in enumerate(lengths) if len(gen[i]) < n]
        got = score([rows[i] + gen[i] for i in live], [[len(rows[i]) + len(gen[i]) - 1] for i in live])
        for i, lg in zip(live, got):
            gen[i].append(int(lg[0].argmax()))
    return gen


@dataclass
class Before:
    """What the unedited model answers (needed to judge the edited one)."""

    target: list[list[int]]  # new target ids per request
    old: list[list[int]]  # old answer ids per request
    neighbor_prompts: list[str] = field(default_factory=list)
    neighbor_owner: list[int] = field(default_factory=list)
    neighbor_old: list[list[int]] = field(default_factory=list)
    perplexity: float | None = None


def before_edit(score: Scorer, tok: Any, requests: Sequence[Request]) -> Before:
    """The unedited model's answers: old answers (``target_true`` or greedy) and the neighbours' greedy answers,
    decoded together."""
    targets = [target_ids(tok, r.text, r.target) for r in requests]
    need = [i for i, r in enumerate(requests) if r.target_true is None]
    nb_prompts, nb_owner = [], []
    for i, r in enumerate(requests):
        for p in r.neighborhood:
            nb_prompts.append(p)
            nb_owner.append(i)
    greedy = greedy_ids(score, tok, [requests[i].text for i in need] + nb_prompts,
                        [len(targets[i]) for i in need] + [len(targets[i]) for i in nb_owner])
    g = iter(greedy[:len(need)])
    old = [target_ids(tok, r.text, r.target_true) if r.target_true is not None else next(g) for r in requests]
    return Before(targets, old, nb_prompts, nb_owner, greedy[len(need):])


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _split(values: list, sizes: Sequence[int]) -> list[list]:
    out, s = [], 0
    for n in sizes:
        out.append(values[s:s + n])
        s += n
    return out


@dataclass
class Judged:
    """Per-item outcomes of one evaluation of the edited model: per request, per paraphrase and per neighbour
    prompt (``None``: the new and the old answer are the same ids, so the item does not count)."""

    prefers_new: list[bool | None]  # per request: mean log P(new) > mean log P(old)
    greedy_new: list[bool]  # per request: greedy continuation == new target
    p_new: list[float]  # per request: exp(mean log P(new))
    para_owner: list[int]
    para_new: list[bool | None]
    para_greedy: list[bool]
    nb_owner: list[int]
    nb_keeps: list[bool | None]  # neighbour: log P(its old answer) > log P(the new target)
    nb_unchanged: list[bool]


def judge(score: Scorer, tok: Any, requests: Sequence[Request], before: Before) -> Judged:
    """Every item's outcome on the edited model: all teacher-forced answers in one engine pass, all greedy
    answers in one decoding loop."""
    prompts = [r.text for r in requests]
    para, para_owner = [], []
    for i, r in enumerate(requests):
        for p in r.paraphrase_texts():
            para.append(p)
            para_owner.append(i)
    nb = before.neighbor_prompts
    p_new, p_old = [before.target[i] for i in para_owner], [before.old[i] for i in para_owner]
    n_new = [before.target[i] for i in before.neighbor_owner]
    groups = [(prompts, before.target), (prompts, before.old), (para, p_new), (para, p_old), (nb, n_new),
              (nb, before.neighbor_old)]
    lp_new, lp_old, pn, po, nn_, no = _split(
        answer_logprob(score, tok, [p for ps, _ in groups for p in ps], [a for _, ans in groups for a in ans]),
        [len(ps) for ps, _ in groups])
    greedy, pg, ng = _split(
        greedy_ids(score, tok, prompts + para + nb, [len(t) for t in before.target + p_new + before.neighbor_old]),
        [len(prompts), len(para), len(nb)])

    def differ(a, b, t, o):
        return a > b if t != o else None

    return Judged([differ(a, b, t, o) for a, b, t, o in zip(lp_new, lp_old, before.target, before.old)],
                  [g == t for g, t in zip(greedy, before.target)], [math.exp(x) for x in lp_new],
                  para_owner, [differ(a, b, t, o) for a, b, t, o in zip(pn, po, p_new, p_old)],
                  [g == t for g, t in zip(pg, p_new)], list(before.neighbor_owner),
                  [differ(o, n, a, b) for o, n, a, b in zip(no, nn_, before.neighbor_old, n_new)],
                  [g == o for g, o in zip(ng, before.neighbor_old)])


def summarize(j: Judged, requests: Sequence[int] | None = None) -> dict[str, Any]:
    """Shares over the requests ``requests`` (indices; all by default) and their paraphrases and neighbours."""
    keep = set(range(len(j.prefers_new)) if requests is None else requests)

    def share(flags, owners=None) -> float | None:
        picked = [f for k, f in enumerate(flags) if (owners[k] if owners is not None else k) in keep and f is not None]
        return _share(picked)

    probs = [p for k, p in enumerate(j.p_new) if k in keep]
    metrics: dict[str, Any] = {"efficacy": share(j.prefers_new), "efficacy_greedy": share(j.greedy_new),
                               "target_prob": round(sum(probs) / len(probs), 4)}
    if any(o in keep for o in j.para_owner):
        metrics["paraphrase"] = share(j.para_new, j.para_owner)
        metrics["paraphrase_greedy"] = share(j.para_greedy, j.para_owner)
    if any(o in keep for o in j.nb_owner):
        metrics["neighborhood"] = share(j.nb_keeps, j.nb_owner)
        metrics["neighborhood_unchanged"] = share(j.nb_unchanged, j.nb_owner)
    return metrics


def after_edit(score: Scorer, tok: Any, requests: Sequence[Request], before: Before) -> dict[str, Any]:
    """Metrics of the edited model against what it answered before (fractions in [0, 1])."""
    return summarize(judge(score, tok, requests, before))


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
