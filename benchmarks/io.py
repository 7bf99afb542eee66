"""I/O benchmark: passthrough and bf16 cast of a synthetic sharded checkpoint vs `cp -r` of the same bytes.

Prints throughput as a ratio to `cp` and peak RSS as a ratio to the largest tensor (goal for tensor-wise
recipes: peak RSS ≤ 2 × largest tensor + 400 MiB, flat in model size). Every run is a whole process (startup
included) after a ``sync``; ``--repeat`` rounds rotate the order, and each ratio is against that round's ``cp``.

    python benchmarks/io.py --gib 2 [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(folder: Path, gib: float, tensor_mib: int) -> int:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    per = tensor_mib << 20
    n = max(1, int(gib * (1 << 30)) // per)
    side = int((per // 4) ** 0.5)
    shard, shards, names = {}, 0, {}
    for i in range(n):
        shard[f"layers.{i}.weight"] = torch.randn(side, side)
        if len(shard) == 4 or i == n - 1:
            shards += 1
            fname = f"model-{shards:05d}-of-XXXXX.safetensors"
            save_file(shard, folder / fname, metadata={"format": "pt"})
            for k in shard:
                names[k] = fname
            shard = {}
    total = shards
    weight_map = {}
    for k, f in names.items():
        new = f.replace("XXXXX", f"{total:05d}")
        if not (folder / new).exists():
            (folder / f).rename(folder / new)
        weight_map[k] = new
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic", "dtype": "float32"}))
    return side * side * 4


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (KiB) of a command, after a ``sync`` so that no run
    pays for the previous one's dirty pages."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr[-2000:]}")

    def field(label: str) -> float:
        return next((float(line.split()[-1]) for line in r.stderr.splitlines() if label in line), 0.0)

    return secs, field("User time") + field("System time"), int(field("Maximum resident"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tensor-mib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of cp / passthrough / cast, order rotated")
    args = ap.parse_args()
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs /usr/bin/time (GNU time) for peak RSS")
    work = Path(tempfile.mkdtemp(prefix="surgeon-io-"))
    try:
        src = work / "src"
        largest = make_checkpoint(src, args.gib, args.tensor_mib)
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        surgeon = [sys.executable, "-m", "surgeon.cli"]
        runs = {
            "cp -r": lambda out: ["cp", "-r", str(src), str(out)],
            "passthrough": lambda out: [*surgeon, "drop", str(src), "--pattern", "^nothing$", "--allow-empty",
                                        "-o", str(out), "-q"],
            "bf16 cast": lambda out: [*surgeon, "cast", str(src), "--dtype", "bfloat16", "-o", str(out), "-q"],
        }
        print(f"checkpoint: {total / (1 << 30):.2f} GiB, largest tensor {largest / (1 << 20):.0f} MiB; "
              f"load average before: {os.getloadavg()[0]:.1f}")
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out = work / "out"
                results[name].append(timed(runs[name](out)))
                shutil.rmtree(out)
        report(results, total, largest)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[tuple[float, float, int]]], total: int, largest: int) -> None:
    """Per round: each run's wall time as a ratio of that round's ``cp``; then the medians."""
    mib = 1 << 20
    cp = [w for w, _, _ in results["cp -r"]]
    print(f"{'run':<12} {'median s':>8} {'GB/s':>6} {'vs cp (median)':>14} {'per round':>22} {'CPU s':>6} "
          f"{'peak RSS MiB':>13} {'RSS/largest':>11}")
    for name, rs in results.items():
        walls = [w for w, _, _ in rs]
        ratios = [c / w for c, w in zip(cp, walls)]
        med = statistics.median(walls)
        rss = max(k for _, _, k in rs)
        print(f"{name:<12} {med:8.2f} {total / med / 1e9:6.2f} {statistics.median(ratios):14.2f} "
              f"{' '.join(f'{x:.2f}' for x in ratios):>22} {statistics.median(c for _, c, _ in rs):6.2f} "
              f"{rss / 1024 if rss else float('nan'):13.0f} {rss * 1024 / largest:11.2f}")
    print(f"goal: passthrough ≥ 0.8 × cp, bf16 cast ≥ 0.6 × cp, peak RSS ≤ 2 × largest + 400 MiB = "
          f"{(2 * largest + 400 * mib) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
