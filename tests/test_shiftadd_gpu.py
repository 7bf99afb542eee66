"""ShiftAdd on CUDA (issue 11): Triton LUT GEMV, dequant + cuBLAS, GPTQ loop and the loaded model equal the CPU
results within tolerance. Skipped without CUDA; run by benchmarks/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _packed(q, n, k, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(0, 256, (q, n, -(-k // 8)), dtype=torch.uint8, generator=g)
    if k % 8:
        qw[..., -1] &= (1 << (k % 8)) - 1
    return qw, torch.randn(q, n, -(-k // gs), generator=g)


@pytest.mark.parametrize("q,n,k,gs", [(3, 4096, 4096, 128), (2, 1536, 576, 128), (3, 130, 200, 40)])
@pytest.mark.parametrize("m", [1, 4, 8, 32])
def test_cuda_matmul_equals_cpu(q, n, k, gs, m):
    pytest.importorskip("triton")
    from surgeon.kernels.shiftadd import PackedLinear

    qw, sc = _packed(q, n, k, gs, seed=m)
    perm = torch.randperm(k)
    lin = PackedLinear(qw, sc, k, gs, perm)
    x = torch.randn(m, k)
    y_cpu = lin.matmul(x)
    y_gpu = lin.matmul(x.cuda())
    assert lin.last_kernel == ("triton-lut" if m <= 8 else "dequant-blas")
    assert y_gpu.is_cuda
    assert (y_gpu.cpu() - y_cpu).abs().max() <= 1e-5 * y_cpu.abs().max() * (k / 64) ** 0.5


def test_gptq_bcq_on_cuda_matches_cpu():
    from surgeon.ops.shiftadd.gptq import output_error, quantize_gptq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    h = x.T @ x / x.shape[0]
    w = torch.randn(384, 256, generator=g) * 0.05
    cpu = quantize_gptq(w, h, 3, 128, rounds=5)
    gpu = quantize_gptq(w, h, 3, 128, rounds=5, device="cuda")
    same_bits = (cpu.qweight == gpu.qweight).float().mean()
    assert same_bits > 0.97  # argmin ties and fp32 reduction order may flip a few signs
    e_cpu, e_gpu = output_error(w, cpu.dense(), h), output_error(w, gpu.dense(), h)
    assert abs(e_cpu - e_gpu) < 0.02 * e_cpu


def test_loaded_packed_model_on_cuda_equals_cpu(tiny_llama, tmp_path):
    pytest.importorskip("triton")
    from surgeon.ops.shiftadd.op import Params, apply

    from surgeon.context import Context
    from surgeon.formats.shiftadd import load_shiftadd
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint
    from surgeon.writer import write_graph

    ctx = Context(device="cuda", quiet=True)
    params = Params(bits=3, group_size=32, rounds=3, weight_only=True)
    g2 = apply(Graph.from_checkpoint(open_checkpoint(tiny_llama)), params, ctx)
    write_graph(g2, tmp_path / "p", ctx=ctx)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        cpu = load_shiftadd(tmp_path / "p")(ids[:, :1]).logits
        gpu = load_shiftadd(tmp_path / "p", device="cuda")(ids[:, :1].cuda()).logits.cpu()
    assert (cpu - gpu).abs().max() < 1e-4
