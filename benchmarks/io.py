"""I/O benchmark: passthrough and bf16 cast of a synthetic sharded checkpoint vs `cp -r` of the same bytes.

Prints throughput as a ratio to `cp` and peak RSS as a ratio to the largest tensor (goal for tensor-wise
recipes: peak RSS ≤ 2 × largest tensor + 400 MiB, flat in model size).

    python benchmarks/io.py --gib 3
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


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, via /usr/bin/time -v when available."""
    t0 = time.perf_counter()
    if shutil.which("time") or Path("/usr/bin/time").exists():
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        secs = time.perf_counter() - t0
        rss = next((int(line.split()[-1]) for line in r.stderr.splitlines() if "Maximum resident" in line), 0)
    else:  # pragma: no cover
        r = subprocess.run(cmd, capture_output=True, text=True)
        secs, rss = time.perf_counter() - t0, 0
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr[-2000:]}")
    return secs, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tensor-mib", type=int, default=128)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surgeon-io-"))
    try:
        src = work / "src"
        largest = make_checkpoint(src, args.gib, args.tensor_mib)
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        subprocess.run(["sync"])
        cp_s, _ = timed(["cp", "-r", str(src), str(work / "cp")])
        surgeon = [sys.executable, "-m", "surgeon.cli"]
        pass_s, pass_rss = timed([*surgeon, "drop", str(src), "--pattern", "^nothing$", "--allow-empty",
                                  "-o", str(work / "pass"), "-q"])
        cast_s, cast_rss = timed([*surgeon, "cast", str(src), "--dtype", "bfloat16", "-o", str(work / "cast"), "-q"])
        mib = 1 << 20
        print(f"checkpoint: {total / (1 << 30):.2f} GiB, largest tensor {largest / mib:.0f} MiB")
        print(f"{'run':<12} {'seconds':>8} {'GB/s':>6} {'vs cp':>6} {'peak RSS MiB':>13} {'RSS/largest':>11}")
        print(f"{'cp -r':<12} {cp_s:8.2f} {total / cp_s / 1e9:6.2f} {1.0:6.2f} {'-':>13} {'-':>11}")
        for name, s, rss in (("passthrough", pass_s, pass_rss), ("bf16 cast", cast_s, cast_rss)):
            print(f"{name:<12} {s:8.2f} {total / s / 1e9:6.2f} {cp_s / s:6.2f} {rss / 1024:13.0f} "
                  f"{rss * 1024 / largest:11.2f}")
        goal = (2 * largest + 400 * mib) / mib
        print(f"goal: peak RSS ≤ 2 × largest + 400 MiB = {goal:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
