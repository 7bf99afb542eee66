"""``eval``: perplexity, fact recall and greedy samples of the current graph; results go to the card.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over consecutive **non-overlapping**
windows of ``seqlen`` tokens (the first token of each window has no context and is not scored; the tail shorter
than a window is dropped). It is therefore a little higher than a sliding-window (strided) evaluation of the
same text, and numbers are comparable only at equal ``seqlen``. Fact recall is the share of prompts whose greedy
next token is the first token of the target; the mean target log-prob is the teacher-forced log-probability of
the whole target continuation, averaged over facts.

The measurements themselves live in :mod:`surgeon.metrics` (the demo and other ops use them too).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surgeon.errors import SurgeonError
from surgeon.metrics import (
    DEFAULT_FACTS,
    DEFAULT_TEXT,
    WINDOW_MODE,
    assets_dir,
    engine_scores,
    greedy_completions,
    load_facts,
)
from surgeon.registry import register

if TYPE_CHECKING:

    from surgeon.context import Context
    from surgeon.graph import Graph

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
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the blocks.")


# ---------------------------------------------------------------------------------------------- pure math
# -------------------------------------------------------------------------------------------------- op
def _resolve(spec: str | None, default: str) -> str | None:
    if spec is None:
        return None
    return str(assets_dir() / default) if spec == "default" else spec


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


@register("eval", Params, writes=False, model_level=True,
          summary="Perplexity, fact recall and samples; results go to the card.")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Evaluate perplexity, fact recall and greedy samples; append one results row to the graph."""
    # everything runs on the block-by-block engine (memory: one block + activations + the output embedding);
    # greedy generation keeps the blocks loaded when they fit the budget, else streams them per token
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
                          if not ppl_spec.startswith(str(assets_dir())) else "surgeon:eval.txt")
        if "facts" in scores:
            fr = scores["facts"]
            result.update(fact_recall=fr["recall"], fact_mean_logprob=fr["mean_logprob"], facts=fr["n"],
                          fact_items=fr["items"])
    if params.generate:
        eng = engine_mod.from_context(graph, ctx, dtype=params.dtype)
        done = greedy_completions(eng, tok, params.generate, params.max_new_tokens, log=ctx.log,
                                  progress=ctx.progress)
        result["samples"] = [{"prompt": p, "completion": c} for p, c in zip(params.generate, done)]
        del eng
    result["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.report(**{k: v for k, v in result.items() if k not in ("kind", "title")})
    ctx.log(_table(result))
    out = graph.copy()
    out.results.append(result)
    return out
