"""Model card (README.md) with YAML front matter built by huggingface_hub's ``ModelCardData``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from surgeon.graph import Graph


def _front_matter(graph: Graph, steps: list[str]) -> str:
    tags = ["surgeon", *sorted({s.split(".")[0] for s in steps}), *graph.tags]
    tags = list(dict.fromkeys(tags))
    library = "diffusers" if "unet" in graph.weight_stems else "transformers"
    try:
        from huggingface_hub import ModelCardData

        data = ModelCardData(base_model=graph.base_model, tags=tags, library_name=library)
        return data.to_yaml()
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        fm = {"tags": tags, "library_name": library}
        if graph.base_model:
            fm["base_model"] = graph.base_model
        return yaml.safe_dump(fm, sort_keys=False).strip()


def _results_tables(results: list[dict[str, Any]]) -> str:
    out = []
    for r in results:
        title = r.get("title", r.get("kind", "Results"))
        rows = {k: v for k, v in r.items() if k not in ("title", "kind") and not isinstance(v, (list, dict))}
        if not rows:
            continue
        out.append(f"### {title}\n\n| metric | value |\n|---|---|")
        for k, v in rows.items():
            out.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        out.append("")
    return "\n".join(out)


def render_card(graph: Graph, *, recipe: dict[str, Any] | None, provenance: dict[str, Any]) -> str:
    steps = [s.get("op", "") for s in provenance.get("steps", [])]
    title = provenance.get("title") or (f"{graph.base_model} — surgeon: {', '.join(steps)}" if graph.base_model
                                        else f"surgeon output: {', '.join(steps) or 'copy'}")
    parts = [f"---\n{_front_matter(graph, steps)}\n---", f"# {title}", ""]
    parts.append("This checkpoint was produced offline with [surgeon](https://pypi.org/project/surgeon/) "
                 f"{provenance.get('surgeon_version', '')}.")
    if steps:
        parts.append("\n## Steps\n")
        for s in provenance.get("steps", []):
            secs = s.get("seconds")
            parts.append(f"- `{s['op']}`" + (f" ({secs:.1f} s)" if isinstance(secs, (int, float)) else ""))
            for note in s.get("info", {}).get("card_notes", []):
                parts.append(f"  - {note}")
    if recipe:
        parts.append("\n## Recipe\n\n```yaml\n" + yaml.safe_dump(recipe, sort_keys=False).strip() + "\n```")
    tables = _results_tables(graph.results)
    if tables:
        parts.append("\n## Results\n\n" + tables)
    parts.append("\nProvenance (inputs, hashes, timings) is in `surgeon.json`.\n")
    return "\n".join(parts)
