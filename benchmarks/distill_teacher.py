"""Where a distillation teacher's logits come from (``retrain.distill``, exact KL; docs/retrain.md), on SmolLM2-135M.

The teacher's full logits for every step of a schedule (``--steps`` steps of ``--batch`` windows of ``--seqlen``
tokens from ``surgeon/assets/artists1734.txt``, the op's own window order), three ways:

- ``module``: the whole fp32 module, forwarded on each step's windows (retrain.distill before issue 18);
- ``streamed``: the model engine over each step's windows, every block read and run again each step;
- ``hidden``: the engine once over the windows the schedule uses, keeping the last block's outputs, then the
  engine's head on each step's rows (what retrain.distill does now).

One mode per process, so the peak RSS printed (``ru_maxrss``) is that mode's; ``checksum`` (Σ of the last step's
logits) shows the three give the same logits.

    nice -n 10 env PYTHONPATH=. .venv/bin/python benchmarks/distill_teacher.py --mode hidden [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("module", "streamed", "hidden"), required=True)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    a = ap.parse_args()

    from importlib.resources import files

    from surgeon.ops.retrain.distill import window_schedule

    from surgeon.context import Context
    from surgeon.engine import Engine
    from surgeon.engine.outputs import last_hidden
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    graph = Graph.from_checkpoint(open_checkpoint(a.model))
    ctx = Context()
    windows = ctx.tokens(str(files("surgeon") / "assets" / "artists1734.txt"), graph, seqlen=a.seqlen)
    schedule = window_schedule(windows.shape[0], a.batch, a.steps, 0)
    used = sorted({i for idx in schedule for i in idx})
    t0 = time.perf_counter()
    with torch.no_grad():
        if a.mode == "module":
            model = ctx.module(graph, dtype="float32")

            def step_logits(idx):
                return model(input_ids=windows[idx], use_cache=False).logits
        elif a.mode == "streamed":
            eng = Engine(graph, micro_batch=a.batch)

            def step_logits(idx):
                return last_hidden(eng, windows[idx]).logits(range(len(idx)))
        else:
            eng = Engine(graph, micro_batch=a.batch)
            hidden = last_hidden(eng, windows[used])
            head = eng.head_weights()
            row = {w: r for r, w in enumerate(used)}

            def step_logits(idx):
                return hidden.logits([row[i] for i in idx], head)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        for idx in schedule:
            logits = step_logits(idx)
        per_step = (time.perf_counter() - t1) / a.steps
    print(json.dumps({"mode": a.mode, "windows": int(windows.shape[0]), "windows_used": len(used),
                      "steps": a.steps, "setup_s": round(setup, 2), "per_step_s": round(per_step, 3),
                      "total_s": round(setup + per_step * a.steps, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "checksum": float(logits.double().sum())}))


if __name__ == "__main__":
    main()
