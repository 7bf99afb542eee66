"""Model card (README.md) with YAML front matter built by huggingface_hub's ``ModelCardData``."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from surgeon.graph import Graph


#: an absolute or home-relative path inside free text ("stats cached at /home/me/.cache/x.pt")
_EMBEDDED_PATH = re.compile(r"(?<![\w.:/~])(~?/[^\s'\"`,;()<>|]+)")


def _is_local_path(text: str) -> bool:
    if text.startswith("builtin:") or "://" in text:
        return False
    if text.startswith(("/", "~", "./", "../")) or Path(text).is_absolute():
        return True
    if not ("/" in text or os.sep in text) or any(c.isspace() for c in text):
        return False  # free text (a sentence that mentions `lora/`) is not a relative path
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not an existing path
        return False


def public_name(text: str) -> str:
    """What a card (or a default ``surgeon.json``) shows for a string that may hold a local path: the file or
    folder name alone (``/home/me/models/SmolLM2`` -> ``SmolLM2``). Repo ids, ``builtin:`` names and other
    text are kept; absolute paths inside free text are reduced to their names too."""
    if _is_local_path(text):
        return Path(text.rstrip("/\\")).name or text
    return _EMBEDDED_PATH.sub(lambda m: Path(m.group(1).rstrip("/")).name or m.group(1), text)


def without_local_paths(obj: Any) -> Any:
    """``obj`` (JSON-like) with every local path replaced by its :func:`public_name`, in keys and values.
    Two keys that would read the same (``/a/model``, ``/b/model``) keep as many trailing parts as tell them
    apart."""
    if isinstance(obj, str):
        return public_name(obj)
    if isinstance(obj, (list, tuple)):
        return [without_local_paths(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    names = {k: public_name(k) if isinstance(k, str) else k for k in obj}
    clash = [k for k in obj if isinstance(k, str) and list(names.values()).count(names[k]) > 1 and names[k] != k]
    for k in clash:
        parts = Path(k).parts
        for n in range(2, len(parts) + 1):
            candidate = "/".join(parts[-n:]).lstrip("/")
            if sum(1 for other in clash if "/".join(Path(other).parts[-n:]).lstrip("/") == candidate) == 1:
                names[k] = candidate
                break
    return {names[k]: without_local_paths(v) for k, v in obj.items()}


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
    """The model card. It is pushed to the Hub, so no local path appears in it (see :func:`public_name`)."""
    recipe = without_local_paths(recipe) if recipe else recipe
    provenance = without_local_paths(provenance)
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
    tables = _results_tables(without_local_paths(graph.results))
    if tables:
        parts.append("\n## Results\n\n" + tables)
    parts.append("\nProvenance (inputs, hashes, timings) is in `surgeon.json`.\n")
    return "\n".join(parts)
