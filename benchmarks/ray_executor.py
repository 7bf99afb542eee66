"""`--executor ray` against the local executor on the same job, on a local 2-node Ray cluster (127.0.0.1).

    .venv/bin/python benchmarks/ray_executor.py [--gib 0.5] [--shard-mib 64]

Builds a synthetic fp32 checkpoint, starts a Ray head and a second node on 127.0.0.1 (`ray start`, 1 CPU each),
runs the same bf16 cast with both executors (many shards, so many tasks), checks the outputs are byte-identical,
and prints wall times, the per-task overhead ((ray - local) / tasks) and what that predicts for N hosts with their
own disks. Stops the cluster with `ray stop` (every Ray process of this user) at the end. Not run by the tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(folder: Path, gib: float, tensor_mib: int) -> int:
    """The synthetic checkpoint of benchmarks/io.py (loaded by path: a module named `io` cannot be imported)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("io_benchmark", Path(__file__).with_name("io.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_checkpoint(folder, gib, tensor_mib)

RAY = str(Path(sys.executable).parent / "ray")


def ray_cli(*args: str) -> None:
    subprocess.run([RAY, *args], check=True, capture_output=True, text=True,
                   env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def timed_run(src: Path, out: Path, shard: str, executor: str) -> float:
    cmd = [sys.executable, "-m", "surgeon.cli", "cast", str(src), "--dtype", "bfloat16", "-o", str(out), "-q",
           "--max-shard-size", shard, "--executor", executor]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=0.5)
    ap.add_argument("--tensor-mib", type=int, default=16)
    ap.add_argument("--shard-mib", type=int, default=32)
    ap.add_argument("--port", type=int, default=6391)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surgeon-ray-"))
    address = f"127.0.0.1:{args.port}"
    try:
        src = work / "src"
        make_checkpoint(src, args.gib, args.tensor_mib)
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
        ray_cli("start", "--head", f"--port={args.port}", "--include-dashboard=false", *common)
        ray_cli("start", f"--address={address}", *common)
        os.environ["RAY_ADDRESS"] = address
        shard = f"{args.shard_mib}MiB"
        local_s = timed_run(src, work / "local", shard, "local")
        ray_s = timed_run(src, work / "ray", shard, "ray")
        files = sorted(p.name for p in (work / "local").glob("*.safetensors"))
        same = all((work / "local" / f).read_bytes() == (work / "ray" / f).read_bytes() for f in files)
        tasks = len(files)
        overhead = (ray_s - local_s) / tasks
        print(f"checkpoint {args.gib:.2f} GiB fp32 -> bf16, {tasks} shards (= Ray tasks), 2 nodes x 1 CPU")
        print(f"{'executor':<8} {'seconds':>8}")
        print(f"{'local':<8} {local_s:8.2f}")
        print(f"{'ray':<8} {ray_s:8.2f}   ({ray_s / local_s:.2f}x local; outputs byte-identical: {same})")
        print(f"per-task overhead: {overhead:.2f} s (connect, ship the shard's graph, worker start-up, result)")
        per_task_work = local_s / tasks
        work_5gb = local_s * 5e9 / (args.gib * (1 << 30))  # the same job's work for one 5 GB shard
        o = max(overhead, 0.0)
        print(f"work per shard here: {per_task_work:.2f} s ({work_5gb:.0f} s for a 5 GB shard). With many more shards "
              "than hosts, each host with its own disk, N hosts give about N x work / (work + overhead):")
        for hosts in (2, 8, 32):
            print(f"  {hosts:>2} hosts: {hosts * per_task_work / (per_task_work + o):5.1f}x local with these shards, "
                  f"{hosts * work_5gb / (work_5gb + o):5.1f}x with 5 GB shards")
    finally:
        subprocess.run([RAY, "stop", "--force"], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
