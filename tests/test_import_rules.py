"""Who may import whom (docs/architecture.md): the layers stay layers.

- ops never import the checkpoint reader or the writer (files go through the Context);
- the framework never imports an op (the registry loads op modules by name from its index);
- kernels import neither the framework nor ops.

Every import counts, also those inside functions and ``if TYPE_CHECKING:`` blocks.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (layer, folder, forbidden module prefixes, files allowed to break the rule with the reason)
RULES = [
    ("ops", "ops", ("surgeon.writer", "surgeon.checkpoint"), {}),
    ("framework", "surgeon", ("surgeon.ops",), {
        "surgeon/registry.py": "loads op modules by name from the op index",
        "surgeon/__init__.py": "mounts ops/ as surgeon.ops in a source checkout",
    }),
    ("kernels", "kernels", ("surgeon.",), {}),
]
KERNELS_MAY_IMPORT = ("surgeon.kernels",)


def imported_modules(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source``; ``from surgeon import writer`` counts as
    ``surgeon.writer``; relative imports are resolved against ``filename``'s package."""
    tree = ast.parse(source, filename)
    package = _package_of(filename)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _package_of(filename: str) -> str:
    p = Path(filename)
    try:
        rel = p.resolve().relative_to(ROOT)
    except ValueError:
        return ""
    parts = list(rel.parts[:-1])
    if parts and parts[0] in ("ops", "kernels"):
        parts = ["surgeon", *parts]
    return ".".join(parts)


def violations(layer: str, source: str, filename: str) -> list[str]:
    """Forbidden imports of one file of ``layer``, as ``file:line imports module`` lines."""
    (_, _, forbidden, _), = [r for r in RULES if r[0] == layer]
    bad = []
    for line, mod in imported_modules(source, filename):
        hit = any(mod == f.rstrip(".") or mod.startswith(f if f.endswith(".") else f + ".") for f in forbidden)
        if layer == "kernels" and mod.startswith(KERNELS_MAY_IMPORT):
            hit = False
        if hit:
            bad.append(f"{filename}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("layer,folder,allowed", [(r[0], r[1], r[3]) for r in RULES], ids=[r[0] for r in RULES])
def test_the_code_follows_the_import_rules(layer, folder, allowed):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        bad += violations(layer, path.read_text(encoding="utf-8"), rel)
    assert not bad, "forbidden imports (see docs/architecture.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("layer,filename,source", [
    ("ops", "ops/prune/x.py", "from surgeon.writer import safetensors_bytes\n"),
    ("ops", "ops/prune/x.py", "def f():\n    from surgeon import checkpoint\n"),
    ("ops", "ops/prune/x.py", "import surgeon.checkpoint as ck\n"),
    ("framework", "surgeon/model.py", "def f():\n    from surgeon.ops.shiftadd import dense_view\n"),
    ("framework", "surgeon/model.py", "from surgeon import ops\n"),
    ("kernels", "kernels/x.py", "from surgeon.graph import Graph\n"),
    ("kernels", "kernels/x.py", "from surgeon.ops.tie import x\n"),
    ("kernels", "kernels/x.py", "from ..graph import Graph\n"),
])
def test_a_forbidden_import_is_caught(layer, filename, source):
    assert violations(layer, source, str(ROOT / filename))


@pytest.mark.parametrize("layer,filename,source", [
    ("ops", "ops/prune/x.py", "from surgeon.graph import Graph\nfrom surgeon.formats import packed\n"),
    ("framework", "surgeon/model.py", "from surgeon.formats.shiftadd import dense_view\n"),
    ("kernels", "kernels/x.py", "from surgeon.kernels.select import kth_smallest\nimport torch\n"),
    ("kernels", "kernels/x.py", "from .select import kth_smallest\n"),
])
def test_allowed_imports_pass(layer, filename, source):
    assert violations(layer, source, str(ROOT / filename)) == []
