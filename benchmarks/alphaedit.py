"""Sequential editing on SmolLM2-135M (issue 22 item 3): 4 sequential batches of 8 counterfactual capitals
(``benchmarks/edit.py``'s fact set), AlphaEdit next to EMMET and MEMIT under the same protocol. Reports the
efficacy of the *first* batch after the fourth, and efficacy / paraphrase / neighbourhood of all 32.

    PYTHONPATH=. .venv/bin/python benchmarks/alphaedit.py [--batches 4] [--batch-size 8] [--stats-tokens 3072]
                                                          [--methods alphaedit,emmet,memit] [--device cpu]

Statistics (C, and AlphaEdit's projector from it) come from ``pydoc_data.topics`` (English text shipped with
Python: no download). Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit import corpus, fact_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stats-tokens", type=int, default=3072)
    ap.add_argument("--methods", default="alphaedit,emmet,memit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=None, help="AlphaEdit nullspace_threshold (default 2e-2)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from surgeon.ops.edit import alphaedit, emmet, memit
    from surgeon.ops.edit import metrics as mx
    from surgeon.ops.edit.requests import Request

    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    if args.model is None:
        from surgeon.gguf import cached_conversion, smollm2_gguf_path

        args.model = str(cached_conversion(smollm2_gguf_path()))
    tmp = Path(tempfile.mkdtemp(prefix="surgeon-alphaedit-bench-"))
    os.environ.setdefault("SURGEON_CACHE", str(tmp / "cache"))
    stats = corpus(tmp / "pydoc.txt")
    facts = fact_set(args.batches * args.batch_size)
    first = [Request(**f) for f in facts[:args.batch_size]]

    def graph():
        return Graph.from_checkpoint(open_checkpoint(args.model))

    ctx0 = Context(device=args.device, quiet=True)
    g0 = graph()
    tok = ctx0.tokenizer(g0)
    before_first = mx.before_edit(mx.EngineScorer(g0, ctx0), tok, first)
    common = {"requests": facts, "stats_data": stats, "stats_tokens": args.stats_tokens, "batch_size": args.batch_size}
    runs = {"alphaedit": (alphaedit, dict(common, **({"nullspace_threshold": args.threshold} if args.threshold
                                                      else {}))),
            "emmet": (emmet, common), "memit": (memit, common)}
    out = {"device": args.device, "threads": args.threads, "load_avg": os.getloadavg()[0]}
    for name in args.methods.split(","):
        mod, kw = runs[name]
        ctx = Context(device=args.device, quiet=True)
        t0 = time.perf_counter()
        g = mod.apply(graph(), mod.Params(**kw), ctx)
        seconds = time.perf_counter() - t0
        firstm = mx.after_edit(mx.EngineScorer(g, ctx), tok, first, before_first)
        info = ctx.step_info
        out[name] = {"seconds": round(seconds, 1), "first_batch_after_last": firstm, "all": info["metrics"],
                     **({"batch_history": info["batch_history"], "nullspace": info["nullspace"]}
                        if name == "alphaedit" else {})}
        print(name, json.dumps(out[name], default=str), flush=True)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
