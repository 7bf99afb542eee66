"""What the CLI prints: the run summary, ``--json`` and the ``--dry-run`` plan."""
from __future__ import annotations

import json
import os
import sys
from typing import Any


def emit(result: dict[str, Any], as_json: bool, quiet: bool = False) -> None:
    """``--json``: one object on stdout. A dry run: the plan for a person on stdout. Otherwise a short summary
    on stderr and the output path on stdout. Under ``torchrun`` only rank 0 reports (the other ranks wrote
    nothing either), so ``--json | jq`` sees one object."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    if result.get("dry_run"):  # the plan is the result: stdout, even with --quiet
        from rich.console import Console

        render_plan(result, Console())
        return
    if not quiet:
        from rich.console import Console
        from rich.table import Table

        console = Console(stderr=True)
        table = Table(title="surgeon", show_header=True)
        table.add_column("step")
        table.add_column("seconds", justify="right")
        table.add_column("notes")
        for s in result.get("steps", []):
            info = {k: v for k, v in s.get("info", {}).items() if not isinstance(v, (dict, list))}
            table.add_row(s["op"], f"{s['seconds']:.2f}", ", ".join(f"{k}={v}" for k, v in list(info.items())[:4]))
        if result.get("steps"):
            console.print(table)
        for r in result.get("results", []):
            rows = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
            console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows.items()))
    if result.get("output"):
        sys.stdout.write(str(result["output"]) + "\n")


def _gb(n: int | None) -> str:
    return "unknown until run" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _short(value: Any, width: int = 60) -> str:
    text = str(value)
    if len(text) <= width:
        return text
    return f"[{len(value)} items]" if isinstance(value, (list, dict)) else text[: width - 1] + "…"


def render_plan(plan: dict[str, Any], console: Any) -> None:
    """``--dry-run`` for a person: inputs, steps with the parameters given, tensors, sizes, peak memory."""
    from rich.markup import escape

    lines = ["[bold]plan[/bold] (dry run: no tensor read, nothing written)"]
    for source in plan.get("inputs", {}).values():
        lines.append(f"  input    {escape(str(source))}")
    for i, step in enumerate(plan.get("steps", []), 1):
        given = ", ".join(f"{k}={_short(v)}" for k, v in step.get("given", step.get("params", {})).items())
        kind = " (forward passes)" if step.get("model_level") else ""
        lines.append(f"  step {i}   {step['op']}{kind}" + (f": {escape(given)}" if given else " (defaults)"))
    lines.append(f"  tensors  {plan.get('tensors')} ({_gb(plan.get('input_bytes'))} in)")
    out = plan.get("output")
    lines.append(f"  output   {escape(str(out)) if out else '(none given)'}: {_gb(plan.get('output_bytes'))}")
    if plan.get("memory_estimate_bytes") is not None:
        lines.append(f"  peak memory  about {plan['memory_estimate_bytes'] / 1e9:.2f} GB")
    lines += _executor_lines(plan.get("executor"))
    console.print("\n".join(lines), highlight=False, soft_wrap=True)  # long paths stay whole


def _executor_lines(executor: dict[str, Any] | None) -> list[str]:
    """Where the writing runs: the local pipeline's budget, or Ray's tasks with their memory requests."""
    if not executor:
        return []
    if executor.get("name") == "ray":
        tasks = executor.get("tasks", [])
        address = executor.get("address") or "(RAY_ADDRESS not set)"
        lines = [f"  executor ray at {address}: {len(tasks)} tasks, one per output shard"]
        lines += [f"    {t['shard']}: {t['tensors']} tensors, {_gb(t['bytes'])}, memory {t['memory_bytes'] / 1e9:.2f} GB"
                  for t in tasks[:8]]
        if len(tasks) > 8:
            lines.append(f"    ... {len(tasks) - 8} more")
        return lines
    return [(f"  executor local: {executor.get('shards')} shards, {executor.get('compute_threads')} compute "
            f"thread(s), in flight at most {executor.get('memory_budget_bytes', 0) / 1e9:.2f} GB")]
