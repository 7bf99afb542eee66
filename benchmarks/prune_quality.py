"""Pruning quality on SmolLM2-135M: magnitude vs Wanda vs SparseGPT at one sparsity, and depth pruning
(``prune.layers``, ShortGPT block influence) for several k, with the written checkpoint's size on disk.

Protocol (docs/prune.md): held-out perplexity on the second half of surgeon's shipped eval.txt, 4 windows of
128 tokens (the slow test's protocol: dense 38.60, magnitude 50 % 878.15); every calibrated row uses the same
calibration text, by default the license texts in /usr/share/common-licenses (as benchmarks/prune.py), cut into
``--calib-windows`` windows of ``--calib-seqlen`` tokens.

    PYTHONPATH=. .venv/bin/python benchmarks/prune_quality.py [--sparsity 0.5] [--ks 2,4,6] [--skip-layers]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def heldout_text(folder: Path) -> Path:
    import surgeon

    paras = (Path(surgeon.__file__).parent / "assets" / "eval.txt").read_text().split("\n\n")
    out = folder / "heldout.txt"
    out.write_text("\n\n".join(paras[len(paras) // 2:]))
    return out


def license_text(folder: Path) -> Path:
    lic = Path("/usr/share/common-licenses")
    files = sorted(p for p in lic.glob("*") if p.is_file() and not p.is_symlink()) if lic.is_dir() else []
    if not files:
        raise SystemExit("no /usr/share/common-licenses: pass --calib FILE")
    out = folder / "calib.txt"
    out.write_text("\n\n".join(p.read_text(errors="ignore") for p in files))
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default=None, help="calibration text (default: the license texts)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--ks", default="2,4,6", help="numbers of blocks to remove")
    ap.add_argument("--skip-sparsity", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    args = ap.parse_args()

    from surgeon.ops.prune import layers, magnitude, sparsegpt, wanda

    from surgeon.api import run_op
    from surgeon.context import Context
    from surgeon.gguf import cached_conversion, smollm2_gguf_path
    from surgeon.graph import Graph
    from surgeon.metrics import perplexity
    from surgeon.sources import open_checkpoint

    torch.manual_seed(0)
    src = cached_conversion(smollm2_gguf_path())
    tmp = Path(tempfile.mkdtemp(prefix="prune-quality-"))
    held = heldout_text(tmp)
    calib = str(args.calib or license_text(tmp))
    g = Graph.from_checkpoint(open_checkpoint(src))
    ctx = Context()
    windows = ctx.tokens(str(held), g, seqlen=128, max_windows=4)
    cal = {"data": calib, "seqlen": args.calib_seqlen, "n_windows": args.calib_windows, "batch_size": 8}
    print(f"held-out {windows.shape[0]}x{windows.shape[1]} tokens of {held}; calibration {calib} "
          f"({args.calib_windows}x{args.calib_seqlen})")

    def ppl(graph: Graph) -> float:
        return float(perplexity(ctx.module(graph), windows, batch_size=4)["perplexity"])

    rows: list[tuple[str, float, float]] = [("dense", ppl(g), 0.0)]
    print(f"dense {rows[0][1]:.2f}")
    if not args.skip_sparsity:
        s = args.sparsity
        for label, make in ((f"magnitude {s:.0%} per matrix", lambda: magnitude.apply(
                                g, magnitude.Params(sparsity=s), Context())),
                            (f"Wanda {s:.0%} per row", lambda: wanda.apply(
                                g, wanda.Params(sparsity=s, **cal), Context())),
                            (f"SparseGPT {s:.0%} per matrix", lambda: sparsegpt.apply(
                                g, sparsegpt.Params(sparsity=s, **cal), Context()))):
            t0 = time.perf_counter()
            pruned = make()
            secs = time.perf_counter() - t0
            rows.append((label, ppl(pruned), secs))
            print(f"{label}: {rows[-1][1]:.2f} ({secs:.0f} s)", flush=True)
        print("\n| model | held-out perplexity | prune time (s) |\n|---|---|---|")
        for label, p, secs in rows:
            print(f"| {label} | {p:.2f} | {secs:.0f} |")
    if args.skip_layers:
        return
    lctx = Context()
    roles = lctx.roles(g)
    t0 = time.perf_counter()
    bi = layers.measure_influence(g, layers.Params(remove=1, **cal), lctx, roles)
    print(f"\nblock influence ({time.perf_counter() - t0:.0f} s): " + ", ".join(f"{i}:{b:.4f}" for i, b in enumerate(bi)))
    print("\n| blocks removed (k) | which (0-based) | layers | held-out perplexity | safetensors on disk (MB) |")
    print("|---|---|---|---|---|")
    print(f"| 0 | — | {roles.n_layers} | {rows[0][1]:.2f} | {folder_bytes(Path(src)) / 1e6:.1f} |")
    for k in (int(x) for x in args.ks.split(",")):
        which = layers.least_influential(bi, k)
        out = tmp / f"minus-{k}"
        run_op("prune.layers", str(src), output=str(out), device="cpu", layers=which)
        pk = ppl(Graph.from_checkpoint(open_checkpoint(out)))
        print(f"| {k} | {','.join(map(str, which))} | {roles.n_layers - k} | {pk:.2f} | "
              f"{folder_bytes(out) / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
