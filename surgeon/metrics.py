"""Measuring a language model: perplexity and fact recall (on a whole module or on the block-by-block engine)
and greedy samples (on the engine). Used by the ``eval`` op, by other ops that measure before/after, and by the demo.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over consecutive **non-overlapping**
windows of ``seqlen`` tokens (the first token of each window has no context and is not scored; the tail shorter
than a window is dropped). It is therefore a little higher than a sliding-window (strided) evaluation of the
same text, and numbers are comparable only at equal ``seqlen``. Fact recall is the share of prompts whose greedy
next token is the first token of the target; the mean target log-prob is the teacher-forced log-probability of
the whole target continuation, averaged over facts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_TEXT = "eval.txt"  # shipped in surgeon/assets/
DEFAULT_FACTS = "facts.jsonl"
WINDOW_MODE = "non-overlapping windows"


def assets_dir() -> Path:
    import surgeon

    return Path(surgeon.__file__).resolve().parent / "assets"


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress=None) -> dict[str, Any]:
    """Perplexity of ``model`` on token ``windows [n, L]``: ``exp(Σ NLL / Σ scored tokens)``, each window scored
    on its ``L − 1`` next-token predictions. ``progress`` optionally wraps the batch loop (e.g. ``ctx.progress``).
    Returns ``perplexity``, ``nll`` (mean, nats), ``tokens`` (scored), ``windows``, ``seqlen``."""
    import torch

    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise SurgeonError(f"perplexity: expected token windows [n >= 1, seqlen >= 2], got {list(windows.shape)}")
    dev = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    starts = range(0, windows.shape[0], batch_size)
    it = progress(starts, len(starts), "perplexity") if progress is not None else starts
    with torch.no_grad():
        for s in it:
            ids = windows[s: s + batch_size].to(dev)
            total += window_nll_sum(model, ids).cpu()
            count += ids[:, 1:].numel()
    mean = float(total) / count
    return {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": count,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}


#: config attributes that make a model's forward transform the head's output (soft-capping, scaling); such
#: models are scored through their full forward instead of the chunked head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
HEAD_CHUNK = 128


def window_nll_sum(model: nn.Module, ids: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Σ next-token NLL (fp64 scalar) of ``ids [b, L]``.

    The vocabulary projection is applied ``chunk`` positions at a time to the backbone's last hidden state, so
    peak memory holds ``b·chunk·vocab`` logits instead of ``b·L·vocab`` (1 GB for one 2048-token window of a
    128k vocabulary). Models whose forward post-processes the logits use the plain forward."""
    import torch
    import torch.nn.functional as F

    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    plain = (head is None or base is None or base is model
             or any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS))
    targets = ids[:, 1:]
    if plain:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
    hidden = base(input_ids=ids, use_cache=False)[0]
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    n = ids.shape[1] - 1
    for s in range(0, n, chunk):
        logits = head(hidden[:, s: min(s + chunk, n)]).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[:, s: s + logits.shape[1]].flatten(),
                                 reduction="sum").double()
        del logits
    return total


def _target_ids(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with the tokenizer's usual specials) and the target's continuation ids.

    Tokenising prompt+target together and splitting off the prompt keeps word boundaries right for
    SentencePiece tokenizers; when the prompt's ids are not a prefix, the target is tokenised alone."""
    p = tok(prompt)["input_ids"]
    full = tok(prompt + target)["input_ids"]
    eos = getattr(tok, "eos_token_id", None)
    if full[: len(p)] == p and len(full) > len(p):
        t = full[len(p):]
    else:
        t = tok(target, add_special_tokens=False)["input_ids"]
    if eos is not None and len(t) > 1 and t[-1] == eos:  # tokenizers that append EOS
        t = t[:-1]
    if p and eos is not None and p[-1] == eos and len(p) > 1:
        p = p[:-1]
    if not t:
        raise SurgeonError(f"fact {prompt!r} -> {target!r}: the target tokenises to nothing")
    return p, t


def fact_recall(model: nn.Module, tok, facts: list[dict[str, str]]) -> dict[str, Any]:
    """Greedy top-1 recall of each fact's first target token and mean teacher-forced target log-prob.

    ``facts``: ``[{"prompt": ..., "target": ...}]``. Returns ``recall``, ``mean_logprob``, ``n`` and ``items``
    (per fact: prompt, target, predicted token text, hit, logprob)."""
    import torch

    if not facts:
        raise SurgeonError("fact recall: no facts given")
    dev = next(model.parameters()).device
    items = []
    with torch.no_grad():
        for f in facts:
            p, t = _target_ids(tok, f["prompt"], f["target"])
            ids = torch.tensor([p + t], device=dev)
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
            first = logp[len(p) - 1]
            pred = int(first.argmax())
            lp = sum(float(logp[len(p) - 1 + j, tid]) for j, tid in enumerate(t))
            items.append({"prompt": f["prompt"], "target": f["target"], "predicted": tok.decode([pred]),
                          "hit": pred == t[0], "logprob": lp})
    return {"recall": sum(i["hit"] for i in items) / len(items),
            "mean_logprob": sum(i["logprob"] for i in items) / len(items), "n": len(items), "items": items}


def greedy_completions(engine, tok, prompts: list[str], max_new_tokens: int = 32, *,
                       log=None, progress=None) -> list[str]:
    """Greedy continuation of each prompt (stops at EOS), decoded without special tokens, generated on the
    block-by-block ``engine`` with a KV cache (:class:`surgeon.engine.Decoder`; prompts of equal token length
    share a batch). ``log`` gets the line saying when blocks are streamed per token; ``progress(iterable,
    total, description)`` wraps the decoding steps (``Context.progress``)."""
    import torch

    from surgeon.engine import Decoder

    ids = [tok(p)["input_ids"] for p in prompts]
    eos = getattr(tok, "eos_token_id", None)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        if not row:
            raise SurgeonError(f"generate: prompt {prompts[i]!r} tokenises to nothing")
        by_length.setdefault(len(row), []).append(i)
    out: list[str] = [""] * len(prompts)
    total = len(by_length) * max_new_tokens
    ticks = iter(progress(range(total), total, "generating") if progress is not None else range(total))
    with Decoder(engine, log=log) as decoder:
        for members in by_length.values():
            new = decoder.decode(torch.tensor([ids[i] for i in members]), max_new_tokens, eos=eos,
                                 tick=lambda: next(ticks, None))
            for row, i in zip(new.tolist(), members):
                kept = row[: row.index(eos)] if eos in row else row
                out[i] = tok.decode(kept, skip_special_tokens=True)
    for _ in ticks:  # rows that stopped at EOS early: let the progress finish
        pass
    return out


def load_facts(path: str | Path) -> list[dict[str, str]]:
    """Facts from a JSONL file of ``{"prompt", "target"}`` objects; errors name the file and line."""
    from surgeon.data import read_jsonl

    facts = []
    for line, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(
                obj.get("target"), str):
            raise SurgeonError(f"{path}:{line}: expected {{\"prompt\": str, \"target\": str}}")
        if not obj["prompt"] or not obj["target"]:
            raise SurgeonError(f"{path}:{line}: prompt and target must be non-empty")
        facts.append({"prompt": obj["prompt"], "target": obj["target"]})
    if not facts:
        raise SurgeonError(f"{path}: no facts")
    return facts


def engine_scores(engine, windows: torch.Tensor | None, tok, facts: list[dict[str, str]] | None,
                  progress=None) -> dict[str, Any]:
    """Perplexity and fact recall from one pass of ``engine`` (block by block) over the windows and the facts'
    prompt+target rows; same definitions as :func:`perplexity` and :func:`fact_recall`. Under ``torchrun``
    each rank scores its slice and the totals are summed."""
    import torch

    from surgeon.engine import dist

    rows: list[torch.Tensor] = [] if windows is None else [windows[i] for i in range(windows.shape[0])]
    n_win = len(rows)
    if windows is not None and (windows.ndim != 2 or windows.shape[1] < 2):
        raise SurgeonError(f"perplexity: expected token windows [n >= 1, seqlen >= 2], got {list(windows.shape)}")
    spans = []
    for f in facts or []:
        p, t = _target_ids(tok, f["prompt"], f["target"])
        rows.append(torch.tensor(p + t))
        spans.append((len(p), t))
    scored = engine.score(rows, progress=progress)
    out: dict[str, Any] = {}
    if n_win:
        local = [i for i in scored.nll if i < n_win]
        acc = torch.tensor([sum(float(scored.nll[i].sum()) for i in local),
                            float(sum(scored.nll[i].numel() for i in local))], dtype=torch.float64)
        dist.all_reduce_(acc)
        mean = float(acc[0]) / float(acc[1])
        out["perplexity"] = {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "nll": mean,
                             "tokens": int(acc[1]), "windows": n_win, "seqlen": int(windows.shape[1])}
    if facts:
        mine = {}
        for k, (lp_len, t) in enumerate(spans):
            gi = n_win + k
            if gi not in scored.nll:
                continue
            nll, am = scored.nll[gi], scored.argmax[gi]
            pred = int(am[lp_len - 1])
            mine[k] = {"prompt": facts[k]["prompt"], "target": facts[k]["target"], "predicted": tok.decode([pred]),
                       "hit": pred == t[0], "logprob": -float(nll[lp_len - 1: lp_len - 1 + len(t)].sum())}
        merged: dict[int, Any] = {}
        for part in dist.gather_objects(mine):
            merged.update(part)
        items = [merged[k] for k in range(len(spans))]
        out["facts"] = {"recall": sum(i["hit"] for i in items) / len(items),
                        "mean_logprob": sum(i["logprob"] for i in items) / len(items), "n": len(items),
                        "items": items}
    return out
