"""One code path for every face: open inputs, validate steps, run them, write the result.

The CLI subcommands, ``surgeon run RECIPE`` and :func:`surgeon.api.run_op` all end in :func:`run_steps`.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from surgeon import __version__
from surgeon.errors import SurgeonError
from surgeon.registry import OpSpec, get_op


@dataclass
class RunOptions:
    output: str | None = None
    force: bool = False
    device: str = "auto"
    seed: int = 0
    max_shard_size: str | int = "5GB"
    allow_pickle: bool = False
    online: bool = False
    allow_nonfinite: bool = False
    quiet: bool = False
    dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def pydantic_message(e: ValidationError, where: str) -> str:
    """One line naming the field(s) and what was expected."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(parts)


def validate_step(op: str, params: dict[str, Any] | BaseModel | None, where: str = "") -> tuple[OpSpec, BaseModel]:
    spec = get_op(op)
    if isinstance(params, spec.params):
        return spec, params
    raw = dict(params or {}) if not isinstance(params, BaseModel) else params.model_dump()
    unknown = [k for k in raw if k not in spec.params.model_fields]
    if unknown:
        from difflib import get_close_matches

        near = get_close_matches(unknown[0], list(spec.params.model_fields), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SurgeonError(f"{where or op}: unknown parameter {unknown[0]!r}{hint}; "
                           f"{op} takes: {', '.join(spec.params.model_fields)}")
    try:
        return spec, spec.params(**raw)
    except ValidationError as e:
        raise SurgeonError(pydantic_message(e, where or op)) from None


def open_models(models: dict[str, str], options: RunOptions):
    from surgeon.checkpoint import open_checkpoint
    from surgeon.graph import Graph

    graphs = {}
    for name, src in models.items():
        ck = open_checkpoint(src, allow_pickle=options.allow_pickle, online=options.online,
                             allow_nonfinite=options.allow_nonfinite)
        graphs[name] = Graph.from_checkpoint(ck)
    return graphs


def run_steps(models: dict[str, str], steps: list[tuple[str, Any]], options: RunOptions, *,
              recipe: dict[str, Any] | None = None, base: str | None = None) -> dict[str, Any]:
    """Validate everything, run the steps on the first (or ``base``) model, write to ``options.output``.

    Returns the machine-readable result (what ``--json`` prints): output, steps with timings and reports,
    results of eval steps.
    """
    if not models:
        raise SurgeonError("no input model given")
    validated = [validate_step(op, params, where=f"steps.{i}.{op}") for i, (op, params) in enumerate(steps)]
    writes = any(spec.writes for spec, _ in validated) or not validated
    if options.output is None and writes and not options.dry_run:
        raise SurgeonError("no output folder given (use -o/--output, or `output:` in the recipe)")
    from surgeon.writer import check_output_location, parse_size

    max_shard = parse_size(options.max_shard_size)
    local_sources = [Path(s) for s in models.values() if Path(s).exists()]
    if options.output is not None and writes and not options.dry_run:
        check_output_location(Path(options.output), local_sources, options.force)

    graphs = open_models(models, options)
    primary_name = base if base in graphs else next(iter(graphs))
    graph = graphs[primary_name]
    if options.dry_run:
        return dry_run_plan(graph, graphs, validated, options)

    from surgeon.context import Context

    if recipe is None:  # the equivalent recipe, so the card shows how to reproduce the run
        recipe = {"model": next(iter(models.values()))} if len(models) == 1 else {"models": dict(models)}
        recipe["steps"] = [{spec.name: params.model_dump(mode="json", exclude_defaults=True)}
                           for spec, params in validated]
        if options.output:
            recipe["output"] = str(options.output)
    ctx = Context.create(options.device, seed=options.seed, graphs=graphs, base_name=base,
                        quiet=options.quiet, allow_nonfinite=options.allow_nonfinite, origin=graph)
    t_start = time.perf_counter()
    step_log: list[dict[str, Any]] = []
    import torch

    for spec, params in validated:
        torch.manual_seed(options.seed)
        ctx.step_info = {}
        t0 = time.perf_counter()
        if not options.quiet and sys.stderr.isatty():  # off a terminal, progress lines name the step
            ctx.log(f"[bold]{spec.name}[/bold] …")
        result = spec.apply(graph, params, ctx)
        if result is None:
            raise SurgeonError(f"internal: {spec.name} returned no graph")
        graph = result
        secs = time.perf_counter() - t0
        step_log.append({"op": spec.name, "params": params.model_dump(mode="json"), "seconds": round(secs, 3),
                         "info": _jsonable(ctx.step_info)})
    provenance = {
        "surgeon_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": ctx.device,
        "seed": options.seed,
        "recipe": recipe,
        "inputs": {name: {"source": g.sources[0].source_id, "files": g.sources[0].header_fingerprint()}
                   for name, g in graphs.items() if g.sources},
        "steps": step_log,
        "results": graph.results,
    }
    out: dict[str, Any] = {"output": None, "steps": step_log, "results": graph.results}
    if options.output is not None and writes:
        summary = write_graph_with(graph, ctx, options, max_shard, provenance, recipe)
        out.update(summary)
    out["seconds"] = round(time.perf_counter() - t_start, 3)
    return out


def write_graph_with(graph, ctx, options: RunOptions, max_shard: int, provenance, recipe) -> dict[str, Any]:
    from surgeon.writer import write_graph

    t0 = time.perf_counter()
    summary = write_graph(graph, options.output, ctx=ctx, force=options.force, max_shard_size=max_shard,
                          allow_nonfinite=options.allow_nonfinite, provenance=provenance, recipe=recipe)
    summary["write_seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _jsonable(obj: Any) -> Any:
    import json

    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        if hasattr(obj, "tolist"):
            return obj.tolist()
        return str(obj)


def dry_run_plan(graph, graphs, validated, options: RunOptions) -> dict[str, Any]:
    """What would happen, without computing: steps, input sizes, output size and a memory estimate."""
    from surgeon.memory import run_estimate

    largest = max((graph[n].nbytes for n in graph.names()), default=0)
    total = sum(graph[n].nbytes for n in graph.names())
    memory = run_estimate(graph, validated, n_models=len(graphs))
    return {
        "output": options.output,
        "dry_run": True,
        "inputs": {k: g.sources[0].source_id for k, g in graphs.items()},
        "steps": [{"op": spec.name, "params": params.model_dump(mode="json"), "model_level": spec.model_level}
                  for spec, params in validated],
        "tensors": len(graph),
        "input_bytes": total,
        "largest_tensor_bytes": largest,
        "memory_estimate_bytes": memory["peak_bytes"],
        "memory_estimate_step_bytes": memory["step_peak_bytes"],
    }
