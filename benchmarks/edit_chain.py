"""The demo chain (recipes/demo.yaml: EMMET ×4 -> 50 % magnitude -> PERP) with variants, measured like surgeon/demo.py.

Usage: PYTHONPATH=$PWD python benchmarks/edit_chain.py '[{"name": "default", "prune": {"sparsity": 0.5}, "perp": {}}]'
(one edit, then per variant: prune params, optional PERP overrides; prints each stage's numbers)."""
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from surgeon.context import Context
from surgeon.data import token_windows
from surgeon.graph import Graph
from surgeon.metrics import assets_dir, fact_recall, load_facts, perplexity
from surgeon.pipeline import validate_step
from surgeon.sources import open_checkpoint

variants = json.loads(sys.argv[1])  # [{"name", "prune": {...}, "perp": {...} or null}]
torch.set_num_threads(2)
raw = yaml.safe_load(Path("recipes/demo.yaml").read_text())
steps = {k: v for s in raw["steps"] for k, v in s.items()}
requests = steps["edit.emmet"]["requests"]
ck = open_checkpoint("builtin:smollm2")
g0 = Graph.from_checkpoint(ck)
ctx = Context.create("cpu", seed=0, graphs={"m": g0}, quiet=True, origin=g0)
windows = token_windows(str(assets_dir() / "eval.txt"), g0, ctx=ctx, seqlen=256, max_windows=8)
facts = load_facts(str(assets_dir() / "facts.jsonl"))

def run(op, graph, params):
    spec, p = validate_step(op, params)
    torch.manual_seed(0)
    ctx.step_info = {}
    t = time.time()
    out = spec.apply(graph, p, ctx)
    return out, {k: v for k, v in ctx.step_info.items() if k in ("protect_edits", "protected_entries", "edit_loss", "loss_first", "loss_last", "sparsity")}, time.time() - t

def measure(graph):
    model = ctx.module(graph, dtype="float32"); tok = ctx.tokenizer(graph)
    with torch.no_grad():
        ppl = perplexity(model, windows)["perplexity"]
    fr = fact_recall(model, tok, facts)["recall"]
    ed = fact_recall(model, tok, [{"prompt": r["prompt"], "target": r["target"]} for r in requests])
    return {"ppl": round(ppl, 2), "facts": round(fr, 3), "efficacy": ed["recall"], "edit_logprob": round(ed["mean_logprob"], 3),
            "pred": [i["predicted"] for i in ed["items"]]}

ge, _, te = run("edit.emmet", g0, steps["edit.emmet"])
print("edit", round(te), measure(ge), flush=True)
for v in variants:
    gp, info, tp = run("prune.magnitude", ge, v["prune"])
    print(v["name"], "after prune", round(tp), info, measure(gp), flush=True)
    if v.get("perp") is not None:
        gq, info, tq = run("retrain.perp", gp, {**steps["retrain.perp"], **v["perp"]})
        print(v["name"], "after perp", round(tq), info, measure(gq), flush=True)
