"""An op's CLI subcommand, generated from its pydantic ``Params``.

Each field becomes an option with its description as help text, its bounds and choices shown, and its value
checked before torch is imported: the spec of every op is stored in ``assets/op_options.json`` (regenerate
with ``python -m surgeon.docgen --op-options``) so that ``--help`` and trivial mistakes never import an op.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgeon.errors import SurgeonError
from surgeon.outputs import AUTO_SHARD_SIZE, SHARD_SIZE_HELP
from surgeon.registry import OP_OPTIONS_FILE, STORED_SPECS  # noqa: F401 - OP_OPTIONS_FILE: the CLI re-exports it
from surgeon.render import emit

RUN_PANEL = "Run options"
FORCE_HELP = "Replace an output folder that an earlier surgeon run wrote (it has surgeon.json); never another."


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
    return {"module": spec.module, "summary": spec.summary, "doc": (spec.apply.__doc__ or spec.summary).strip(),
            "multi_model": spec.multi_model, "writes": spec.writes,
            "takes_models": "models" in spec.params.model_fields, "fields": fields}


def render_op_options() -> str:
    """``assets/op_options.json``: every registered op's module, summary and CLI spec, in help order
    (``python -m surgeon.docgen --op-options``); it is also the registry's index."""
    from surgeon.registry import discover

    return json.dumps({op: op_cli_spec(op) for op in discover()}, indent=1, ensure_ascii=False) + "\n"


def _stored_cli_spec(op_name: str) -> dict[str, Any]:
    """The stored spec, or the live one for an op added since the file was generated."""
    return STORED_SPECS.get(op_name) or op_cli_spec(op_name)


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
    from surgeon.outputs import check_output_location, parse_shard_size
    from surgeon.sources import missing_source_message

    for src in dict.fromkeys(models.values()):
        message = missing_source_message(src)
        if message:
            raise SurgeonError(message)
    if not writes or run_kw.get("dry_run"):
        return
    parse_shard_size(run_kw.get("max_shard_size", AUTO_SHARD_SIZE))
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
            opt("output", Optional[str], None,  # noqa: UP045 (typer reads the annotation)
                "--output", "-o", help="Output folder (written atomically)."),
            opt("force", bool, False, "--force", help=FORCE_HELP),
            opt("max_shard_size", str, AUTO_SHARD_SIZE, "--max-shard-size", help=SHARD_SIZE_HELP),
            opt("executor", str, "local", "--executor",
                help="local | ray (one task per output shard on the Ray cluster named by RAY_ADDRESS)."),
            opt("dry_run", bool, False, "--dry-run", help="Print the plan (tensors, sizes, memory) and stop."),
            opt("record_paths", bool, False, "--record-paths",
                help="Keep full local paths in surgeon.json (by default inputs appear by name; the card never "
                     "shows local paths)."),
        ]
    engine = ("the block-by-block model engine keeps at most this much: generation holds blocks resident up to it "
              "(default 6 GiB) and streams the rest from disk, hidden states beyond it spill to disk (default: 1 "
              "GiB of them in RAM)")
    params.append(opt("max_memory", Optional[str], None, "--max-memory",  # noqa: UP045
                      help=(f"Memory budget, e.g. 4GB: what the writer may hold in flight (default: a quarter of "
                            f"the available RAM); {engine}." if writes else f"Memory budget, e.g. 2GB: {engine}.")))
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
            ann = Annotated[list[str] | None, typer.Option(flag, help=_field_help(entry), show_default=False)]
        elif tp is bool:
            default = entry.get("flag_default", False)
            ann = Annotated[bool, typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=_field_help(entry),
                                               show_default=False)]
        else:
            ann = Annotated[tp | None, typer.Option(flag, help=_field_help(entry), show_default=False)]
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
                      max_shard_size=run_kw.get("max_shard_size", AUTO_SHARD_SIZE), max_memory=run_kw.get("max_memory"),
                      executor=run_kw.get("executor", "local"),
                      allow_pickle=run_kw.get("allow_pickle", False), online=run_kw.get("online", False),
                      allow_nonfinite=run_kw.get("allow_nonfinite", False), quiet=run_kw.get("quiet", False),
                      dry_run=run_kw.get("dry_run", False), record_paths=run_kw.get("record_paths", False))
    result = run_steps(models, steps, opts, base=base, recipe=recipe)
    emit(result, run_kw.get("json_out", False), quiet=opts.quiet)
