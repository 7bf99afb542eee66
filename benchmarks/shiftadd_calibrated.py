"""Calibrated ShiftAdd on SmolLM2-135M at the slow test's settings (3 bits, g128, 4 rounds, model:8 x 128 tokens,
dense output): fit seconds, peak RSS during the fit, mean output error, held-out perplexity (eval.txt, 4 x 256).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/shiftadd_calibrated.py LABEL
"""
import resource
import sys
import time

import torch

torch.set_num_threads(1)
from surgeon.ops.evaluate import _assets_dir, perplexity
from surgeon.ops.shiftadd.op import Params, apply

from surgeon.context import Context
from surgeon.gguf import cached_conversion, smollm2_gguf_path
from surgeon.graph import Graph
from surgeon.model import materialize
from surgeon.sources import open_checkpoint

src = cached_conversion(smollm2_gguf_path())
g = Graph.from_checkpoint(open_checkpoint(src))
ctx = Context(quiet=True)
held = ctx.tokens(str(_assets_dir() / "eval.txt"), g, seqlen=256, max_windows=4)
t0 = time.time()
g2 = apply(g, Params(bits=3, group_size=128, rounds=4, data="model:8", seqlen=128, materialize=True), ctx)
t = time.time() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(sys.argv[1], "fit_s", round(t, 1), "peak_rss_GB_during_fit", round(rss, 2), "out_err", ctx.step_info["output_rel_error_mean"], flush=True)
print(sys.argv[1], "ppl", perplexity(materialize(g2), held)["perplexity"], flush=True)
