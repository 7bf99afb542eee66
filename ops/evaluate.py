"""``eval``: perplexity, fact recall and greedy samples of the current graph; results go to the card.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over consecutive **non-overlapping**
windows of ``seqlen`` tokens (the first token of each window has no context and is not scored; the tail shorter
than a window is dropped). It is therefore a little higher than a sliding-window (strided) evaluation of the
same text, and numbers are comparable only at equal ``seqlen``. Fact recall is the share of prompts whose greedy
next token is the first token of the target; the mean target log-prob is the teacher-forced log-probability of
the whole target continuation, averaged over facts.

The pure functions :func:`perplexity`, :func:`fact_recall` and :func:`greedy_generate` take a module and are
reused by other ops (edit, retrain) to measure before/after.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surgeon.errors import SurgeonError
from surgeon.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from surgeon.context import Context
    from surgeon.graph import Graph

DEFAULT_TEXT = "eval.txt"  # shipped in surgeon/assets/
DEFAULT_FACTS = "facts.jsonl"
WINDOW_MODE = "non-overlapping windows"


def _assets_dir() -> Path:
    import surgeon

    return Path(surgeon.__file__).resolve().parent / "assets"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    perplexity: str | None = Field(
        None, description="Text for perplexity: a .txt/.jsonl file, a datasets folder, `model:N` (text sampled from "
        "the model) or `default` (the text shipped with surgeon). With no --perplexity/--facts/--generate, both "
        "defaults run.")
    facts: str | None = Field(
        None, description="JSONL file of {\"prompt\", \"target\"} lines: greedy top-1 match rate of the target's "
        "first token and mean target log-prob; `default` uses the facts shipped with surgeon.")
    generate: list[str] = Field(default_factory=list, description="Prompts to complete greedily (shown in the "
                                "table and stored with the results).", json_schema_extra={"cli_keep_commas": True})
    seqlen: int = Field(512, ge=2, description="Tokens per perplexity window (capped at 2048 and the model's context).")
    max_windows: int | None = Field(None, ge=1, description="Evaluate at most this many windows (a seeded subset).")
    batch_size: int = Field(1, ge=1, description="Windows per forward pass.")
    max_new_tokens: int = Field(32, ge=1, le=2048, description="Tokens generated per --generate prompt.")
    field: str = Field("text", description="JSONL/datasets field holding the text.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the module.")


# ---------------------------------------------------------------------------------------------- pure math
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


def greedy_generate(model: nn.Module, tok, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (stops at EOS), decoded without special tokens."""
    import torch

    from surgeon.model import decode_step

    dev = next(model.parameters()).device
    ids = torch.tensor([tok(prompt)["input_ids"]], device=dev)
    eos = getattr(tok, "eos_token_id", None)
    out: list[int] = []
    past = None
    cur = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            last, past = decode_step(model, cur, past)
            nxt = int(last[0].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            cur = torch.tensor([[nxt]], device=dev)
    return tok.decode(out, skip_special_tokens=True)


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


# -------------------------------------------------------------------------------------------------- op
def _resolve(spec: str | None, default: str) -> str | None:
    if spec is None:
        return None
    return str(_assets_dir() / default) if spec == "default" else spec


def _table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title="eval", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("perplexity", "nll", "tokens", "windows", "seqlen", "window_mode", "fact_recall",
                "fact_mean_logprob", "facts", "seconds"):
        if key in result:
            v = result[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    for s in result.get("samples", []):
        table.add_row(f"generate: {s['prompt']}", repr(s["completion"]))
    return table


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


@register("eval", Params, writes=False, model_level=True)
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Evaluate perplexity, fact recall and greedy samples; append one results row to the graph."""
    # perplexity and fact recall run on the block-by-block engine (memory: one block + activations + the output
    # embedding); greedy generation builds the whole module (KV-cache decoding): for models that fit in memory
    from surgeon import engine as engine_mod

    ppl_spec, facts_spec = params.perplexity, params.facts
    if ppl_spec is None and facts_spec is None and not params.generate:
        ppl_spec, facts_spec = "default", "default"
    ppl_spec = _resolve(ppl_spec, DEFAULT_TEXT)
    facts_spec = _resolve(facts_spec, DEFAULT_FACTS)
    if not graph.configs.get("") and "unet" in graph.configs:
        raise SurgeonError("eval: measures causal language models; this is a diffusers pipeline")
    facts = load_facts(facts_spec) if facts_spec else None  # fail on a bad file before any forward pass
    t0 = time.perf_counter()
    windows = ctx.tokens(ppl_spec, graph, seqlen=params.seqlen, max_windows=params.max_windows,
                         field=params.field) if ppl_spec else None
    tok = ctx.tokenizer(graph) if (facts or params.generate) else None
    result: dict[str, Any] = {"kind": "eval", "title": "Evaluation"}
    if windows is not None or facts:
        eng = engine_mod.from_context(graph, ctx, dtype=params.dtype, micro_batch=params.batch_size)
        scores = engine_scores(eng, windows, tok, facts, progress=ctx.progress)
        ctx.report(**eng.timing())
        del eng
        if "perplexity" in scores:
            result.update(scores["perplexity"])
            result.update(window_mode=WINDOW_MODE, perplexity_data=ppl_spec
                          if not ppl_spec.startswith(str(_assets_dir())) else "surgeon:eval.txt")
        if "facts" in scores:
            fr = scores["facts"]
            result.update(fact_recall=fr["recall"], fact_mean_logprob=fr["mean_logprob"], facts=fr["n"],
                          fact_items=fr["items"])
    if params.generate:
        model = ctx.module(graph, dtype=params.dtype)
        result["samples"] = [{"prompt": p, "completion": greedy_generate(model, tok, p, params.max_new_tokens)}
                             for p in params.generate]
        del model
    result["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.report(**{k: v for k, v in result.items() if k not in ("kind", "title")})
    ctx.log(_table(result))
    out = graph.copy()
    out.results.append(result)
    return out
