"""Generate ``docs/recipes.md`` (the recipe schema reference) and ``surgeon/assets/op_options.json`` (what the
CLI builds op commands from without importing torch) from the pydantic models themselves.

    python -m surgeon.docgen > docs/recipes.md
    python -m surgeon.docgen --op-options > surgeon/assets/op_options.json
"""
from __future__ import annotations

import typing

from pydantic import BaseModel


def _type_name(tp: typing.Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fields_table(model: type[BaseModel]) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        default = "required" if f.is_required() else (
            "[]" if f.default_factory is list else "{}" if f.default_factory is dict else repr(f.default))
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type_name(f.annotation)} | {default} | {desc} |")
    return rows


def render() -> str:
    from surgeon.recipe import PushSpec, Recipe
    from surgeon.registry import OP_INDEX, get_op

    out = ["# Recipe reference", "",
           "Generated from the pydantic models by `python -m surgeon.docgen` (a test keeps it current).",
           "Every step is `- op.name: {params}`; the same fields are the CLI options (`foo_bar` → `--foo-bar`).",
           "", "## Top level", ""]
    out += _fields_table(Recipe)
    out += ["", "### push", ""] + _fields_table(PushSpec)
    out += ["", "## Operations", ""]
    for name in OP_INDEX:
        spec = get_op(name)
        cli = "surgeon " + name.replace(".", " ")
        out += [f"### `{name}`", "", spec.summary, "", (f"CLI: `{cli} {'MODELS...' if spec.multi_model else 'MODEL'}"
                f"{' -o OUT' if spec.writes else ''} [options]`"), ""]
        out += _fields_table(spec.params) + [""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--op-options"]:  # the CLI's stored option specs (tests/test_docs.py keeps it current)
        from surgeon.cli import render_op_options

        print(render_op_options(), end="")
    else:
        print(render(), end="")
