"""One code path for every face: open inputs, validate steps, run them, write the result.

The CLI subcommands, ``surgeon run RECIPE`` and :func:`surgeon.api.run_op` all end in :func:`run_steps`.
"""
from __future__ import annotations

import os
import platform
import re
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
    max_shard_size: str | int = "auto"
    max_memory: str | int | None = None
    executor: str = "local"
    allow_pickle: bool = False
    online: bool = False
    allow_nonfinite: bool = False
    quiet: bool = False
    dry_run: bool = False
    record_paths: bool = False  # full local paths in surgeon.json (the card never has them)
    arch: dict[str, Any] | None = None  # architecture role overrides for every step (recipe ``arch:``)
    extra: dict[str, Any] = field(default_factory=dict)


#: pydantic's prefixes on messages raised by validators ("Value error, sparsity must be ...")
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def as_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags_in(message: str, fields: list[str]) -> str:
    """``nm: ...`` / ``sparsity=0.3 contradicts nm=2:4`` -> ``--nm: ...`` / ``--sparsity=0.3 contradicts
    --nm=2:4``: field names that a validator wrote in recipe style, as the CLI flags the user typed."""
    if not fields:
        return message
    names = "|".join(re.escape(f) for f in sorted(fields, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({names})(?=[=:])", lambda m: as_flag(m.group(1)), message)


def pydantic_message(e: ValidationError, where: str, *, cli_fields: list[str] | None = None) -> str:
    """One line naming the field(s) and what was expected. With ``cli_fields`` (the command line), fields are
    named as flags (``--bits``) and there is no ``where`` prefix."""
    parts = []
    for err in e.errors():
        loc_parts = [str(x) for x in err.get("loc", ()) if x != "__root__"]
        msg = str(err.get("msg", "invalid"))
        for prefix in _PYDANTIC_PREFIXES:
            msg = msg.removeprefix(prefix)
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        if cli_fields is not None:
            msg = _flags_in(msg, cli_fields)
            loc = " ".join([as_flag(loc_parts[0]), *loc_parts[1:]]) if loc_parts else ""
        else:
            loc = ".".join(loc_parts)
        named = not loc or msg.startswith(f"{loc}:")  # a validator that already names its field ("nm: ...")
        parts.append(msg if named else f"{loc}: {msg}")
    text = "; ".join(parts)
    return text if cli_fields is not None else f"{where}: {text}"


def validate_step(op: str, params: dict[str, Any] | BaseModel | None, where: str = "", *,
                  cli: bool = False) -> tuple[OpSpec, BaseModel]:
    """``op``'s params validated. Errors name ``where: field`` (recipes) or, with ``cli``, the flag."""
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
        fields = list(spec.params.model_fields) if cli else None
        raise SurgeonError(pydantic_message(e, where or op, cli_fields=fields)) from None


def open_models(models: dict[str, str], options: RunOptions):
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    graphs = {}
    for name, src in models.items():
        ck = open_checkpoint(src, allow_pickle=options.allow_pickle, online=options.online,
                             allow_nonfinite=options.allow_nonfinite)
        graphs[name] = Graph.from_checkpoint(ck)
    return graphs


def check_executor(options: RunOptions) -> None:
    """Refuse an unknown executor or a budget that cannot parse, and reach the Ray cluster, before any work."""
    from surgeon.executor import memory_budget

    if options.executor not in ("local", "ray"):
        raise SurgeonError(f"--executor: expected local or ray, got {options.executor!r}")
    memory_budget(options.max_memory)
    if options.executor == "ray" and not options.dry_run:
        from surgeon.ray_executor import connect

        connect()


def equivalent_recipe(models: dict[str, str], validated: list, options: RunOptions) -> dict[str, Any]:
    """The recipe a CLI call amounts to, so that the card shows how to reproduce the run."""
    recipe: dict[str, Any] = ({"model": next(iter(models.values()))} if len(models) == 1
                              else {"models": dict(models)})
    recipe["steps"] = [{spec.name: params.model_dump(mode="json", exclude_defaults=True)}
                       for spec, params in validated]
    if options.output:
        recipe["output"] = str(options.output)
    return recipe


def apply_steps(graph, validated: list, ctx, options: RunOptions) -> tuple[Any, list[dict[str, Any]]]:
    """Run the validated steps in order (each with the run's seed); returns the last graph and the step log."""
    step_log: list[dict[str, Any]] = []
    for spec, params in validated:
        if not spec.torch_free or "torch" in sys.modules:  # torch-free ops: a run of only these never imports it
            import torch

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
    return graph, step_log


def run_steps(models: dict[str, str], steps: list[tuple[str, Any]], options: RunOptions, *,
              recipe: dict[str, Any] | None = None, base: str | None = None) -> dict[str, Any]:
    """Validate everything, run the steps on the first (or ``base``) model, write to ``options.output``.

    Returns the machine-readable result (what ``--json`` prints): output, steps with timings and reports,
    results of eval steps.
    """
    if not models:
        raise SurgeonError("no input model given")
    from surgeon.sources import missing_source_message

    for src in models.values():  # before the op modules (and torch) are imported
        if missing_source_message(src):
            raise SurgeonError(missing_source_message(src) or "")
    validated = [validate_step(op, params, where=f"steps.{i}.{op}") for i, (op, params) in enumerate(steps)]
    writes = any(spec.writes for spec, _ in validated) or not validated
    if options.output is None and writes and not options.dry_run:
        raise SurgeonError("no output folder given (use -o/--output, or `output:` in the recipe)")
    from surgeon.outputs import check_output_location, parse_shard_size

    parse_shard_size(options.max_shard_size)  # refused before any model is read
    check_executor(options)
    local_sources = [Path(s) for s in models.values() if Path(s).exists()]
    if options.output is not None and writes and not options.dry_run:
        check_output_location(Path(options.output), local_sources, options.force)

    graphs = open_models(models, options)
    primary_name = base if base in graphs else next(iter(graphs))
    graph = graphs[primary_name]
    if options.dry_run:
        return dry_run_plan(graph, graphs, validated, options)

    from surgeon.context import Context

    recipe = recipe if recipe is not None else equivalent_recipe(models, validated, options)
    ctx = Context.create(options.device, seed=options.seed, graphs=graphs, base_name=base,
                         quiet=options.quiet, allow_nonfinite=options.allow_nonfinite, origin=graph,
                         arch=options.arch, allow_pickle=options.allow_pickle, online=options.online,
                         max_memory=options.max_memory,
                         work_dir=str(Path(options.output).resolve().parent) if options.output else None)
    t_start = time.perf_counter()
    graph, step_log = apply_steps(graph, validated, ctx, options)
    provenance = {
        "surgeon_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "device": ctx.device,
        "seed": options.seed,
        "recipe": recipe,
        "inputs": {name: {"source": g.sources[0].source_id, "files": g.sources[0].header_fingerprint()}
                   for name, g in graphs.items() if g.sources},
        "steps": step_log,
        "results": graph.results,
    }
    out: dict[str, Any] = {"output": None, "steps": step_log, "results": graph.results}
    if options.output is not None and writes and _is_writer():  # under torchrun only rank 0 writes
        summary = write_graph_with(graph, ctx, options, provenance, recipe)
        out.update(summary)
    out["seconds"] = round(time.perf_counter() - t_start, 3)
    return out


def _torch_version() -> str | None:
    """torch's version, without importing it when the run did not need it."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _is_writer() -> bool:
    if "torch" not in sys.modules:  # no process group without torch: the launcher's RANK decides
        return int(os.environ.get("RANK", "0")) == 0
    from surgeon.engine.dist import is_writer

    return is_writer()


def write_graph_with(graph, ctx, options: RunOptions, provenance, recipe) -> dict[str, Any]:
    from surgeon.writer import write_graph

    t0 = time.perf_counter()
    summary = write_graph(graph, options.output, ctx=ctx, force=options.force, max_shard_size=options.max_shard_size,
                          allow_nonfinite=options.allow_nonfinite, provenance=provenance, recipe=recipe,
                          max_memory=options.max_memory, executor=options.executor,
                          record_paths=options.record_paths)
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


#: ops whose ``apply`` only builds lazy nodes (reads no tensor): a dry run applies them to learn output shapes
#: and dtypes. Model-level ops change values, never shapes or dtypes.
PLANNED_BY_APPLYING = {"cast", "drop", "rename", "prune.magnitude", "merge.linear", "merge.task-arithmetic",
                       "merge.ties", "merge.dare"}


def planned_graph(graph, graphs, validated, options: RunOptions):
    """The graph the run would write, built without computing any tensor; None when a step changes the format
    in a way only running it tells (ShiftAdd packing, tying, OPCM/RMM/MWA/revert, recover)."""
    from surgeon.context import Context

    g = graph
    ctx = Context(device="cpu", seed=options.seed, graphs=graphs, quiet=True, origin=graph)
    for spec, params in validated:
        if spec.name in PLANNED_BY_APPLYING:
            g = spec.apply(g, params, ctx)
        elif not (spec.model_level or not spec.writes):
            return None
    return g


def dry_run_plan(graph, graphs, validated, options: RunOptions) -> dict[str, Any]:
    """What would happen, without computing: steps, input sizes, output size and a memory estimate."""
    from surgeon.memory import run_estimate

    largest = max((graph[n].nbytes for n in graph.names()), default=0)
    total = sum(graph[n].nbytes for n in graph.names())
    from surgeon.graph import runs_on_host
    from surgeon.lora import adapter_folder

    host_inputs = all(adapter_folder(g) is None and all(runs_on_host(g[n]) for n in g.names())
                      for g in graphs.values())
    memory = run_estimate(graph, validated, n_models=len(graphs), host_inputs=host_inputs)
    planned = planned_graph(graph, graphs, validated, options)
    return {
        "output": str(Path(options.output).expanduser().resolve()) if options.output else None,
        "dry_run": True,
        "inputs": {k: g.sources[0].source_id for k, g in graphs.items()},
        "steps": [{"op": spec.name, "params": params.model_dump(mode="json"), "model_level": spec.model_level,
                   "given": params.model_dump(mode="json", exclude_unset=True)}
                  for spec, params in validated],
        "tensors": len(graph),
        "input_bytes": total,
        "output_bytes": None if planned is None else sum(planned[n].nbytes for n in planned.names()),
        "largest_tensor_bytes": largest,
        "memory_estimate_bytes": memory["peak_bytes"],
        "memory_estimate_step_bytes": memory["step_peak_bytes"],
        "executor": executor_plan(graph if planned is None else planned, options),
    }


def executor_plan(graph, options: RunOptions) -> dict[str, Any]:
    """Where the tensor-wise writing runs: the local pipeline's budget and threads, or Ray's tasks (one per
    output shard, each with its memory request), for the planned output graph (the input's where a step's
    output is only known by running it)."""
    from surgeon.executor import compute_workers, largest_task, memory_budget
    from surgeon.writer import plan_shards, shard_size_for

    budget = memory_budget(options.max_memory, largest_task(graph, graph.names()))
    plans = plan_shards(graph, shard_size_for(graph, options.max_shard_size))
    if options.executor == "ray":
        from surgeon.ray_executor import dry_run_tasks

        return {"name": "ray", "address": os.environ.get("RAY_ADDRESS") or None,
                "tasks": dry_run_tasks(graph, plans, budget)}
    return {"name": "local", "memory_budget_bytes": budget, "compute_threads": compute_workers(),
            "shards": len(plans)}
