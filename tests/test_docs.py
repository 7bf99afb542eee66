"""Docs stay true: the generated recipe reference is current, every op has a recipe and a doc page."""
from __future__ import annotations

from pathlib import Path

import yaml

from surgeon.registry import OP_INDEX

REPO = Path(__file__).resolve().parents[1]
DOC_OF = {"merge": "merge", "edit": "edit", "erase": "erase", "prune": "prune", "retrain": "prune",
          "shiftadd": "shiftadd", "tie": "tie", "recover": "recover", "eval": "eval"}


def test_recipe_reference_is_generated_from_the_models():
    from surgeon.docgen import render

    assert (REPO / "docs" / "recipes.md").read_text() == render(), \
        "regenerate with: python -m surgeon.docgen > docs/recipes.md"


def test_every_op_has_a_doc_page_and_a_recipe_step():
    used = set()
    for r in (REPO / "recipes").glob("*.yaml"):
        for step in yaml.safe_load(r.read_text())["steps"]:
            used |= set(step)
    for op in OP_INDEX:
        family = op.split(".")[0]
        if family in DOC_OF:
            assert (REPO / "docs" / f"{DOC_OF[family]}.md").is_file(), op
    missing = [op for op in OP_INDEX if op not in used and op not in ("cast", "drop", "rename")]
    assert not missing, f"no recipe uses {missing}"


def test_readme_gives_the_two_commands():
    text = (REPO / "README.md").read_text()
    head = "\n".join(text.splitlines()[:15])
    assert "make demo" in head and "make test" in head
    assert "MEASURED_TABLE" not in text


def test_stored_cli_options_are_generated_from_the_models():
    """The CLI builds op commands (and their --help) from this file so that it never imports torch for them."""
    from surgeon.cli import OP_OPTIONS_FILE, render_op_options

    assert OP_OPTIONS_FILE.read_text(encoding="utf-8") == render_op_options(), \
        "regenerate with: python -m surgeon.docgen --op-options > surgeon/assets/op_options.json"
