"""YAML recipes: a versioned schema validated before any tensor is read.

```yaml
version: 1
model: ./smollm2-135m            # or  models: {base: ./base, math: ./math}
steps:
  - prune.magnitude: {sparsity: 0.5}
  - eval: {perplexity: ./heldout.txt}
output: ./out
push: {repo_id: me/model, private: true}
```

Relative paths (``model``, ``models``, ``output`` and every data file of a step) are relative to the current
folder, as on the command line, whatever folder the recipe file is in.
"""
from __future__ import annotations

import os
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from surgeon.errors import SurgeonError
from surgeon.outputs import AUTO_SHARD_SIZE, SHARD_SIZE_HELP

SCHEMA_VERSION = 1


class PushSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo_id: str = Field(description="Hub repository id, e.g. me/model-pruned.")
    private: bool = Field(False, description="Create the repository as private.")
    revision: str | None = Field(None, description="Branch to push to (default: main).")
    commit_message: str | None = Field(None, description="Commit message (default: the recipe's steps).")


class Recipe(BaseModel):
    """A whole run: inputs, ordered steps, output, optional push."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(SCHEMA_VERSION, description="Recipe schema version (currently 1).")
    model: str | None = Field(None, description="Input checkpoint: folder, .safetensors, .gguf, cached repo id or "
                                                "builtin:smollm2. Relative paths here and everywhere in a recipe "
                                                "are relative to the current folder.")
    models: dict[str, str] | None = Field(None, description="Named inputs for merges: {name: path}.")
    base: str | None = Field(None, description="Name (in `models`) of the base model for merges.")
    steps: list[dict[str, dict[str, Any] | None]] = Field(description="Ordered operations: `- op.name: {params}`.")
    output: str | None = Field(None, description="Output folder (written atomically; relative to the current "
                                                 "folder).")
    push: PushSpec | None = Field(None, description="Push the output to the Hub after writing.")
    device: str = Field("auto", description="auto | cpu | cuda for every step's heavy math.")
    seed: int = Field(0, description="Seed for every random choice (sampling, DARE drops, LoRA init).")
    max_shard_size: str = Field(AUTO_SHARD_SIZE, description=SHARD_SIZE_HELP)
    max_memory: str | None = Field(None, description="Memory the writer may hold in flight, e.g. 4GB "
                                   "(default: a quarter of the available RAM).")
    executor: Literal["local", "ray"] = Field("local", description="Where tensor-wise work runs: local (a pipeline "
                                              "on this machine) or ray (one task per output shard on the cluster "
                                              "named by RAY_ADDRESS).")
    allow_nonfinite: bool = Field(False, description="Write tensors containing NaN/Inf instead of refusing.")
    record_paths: bool = Field(False, description="Keep full local paths in surgeon.json (by default inputs and "
                                                  "data files appear by name; the model card never shows them).")
    arch: dict[str, Any] | None = Field(None, description="Architecture role overrides for unknown families.")

    @model_validator(mode="after")
    def _one_input(self) -> Recipe:
        if (self.model is None) == (self.models is None):
            raise ValueError("give exactly one of `model` or `models`")
        if self.version != SCHEMA_VERSION:
            raise ValueError(f"unsupported recipe version {self.version} (this surgeon reads version 1)")
        for i, step in enumerate(self.steps):
            if len(step) != 1:
                raise ValueError(f"steps.{i}: each step is one mapping `op.name: {{params}}`, got {list(step)}")
        return self


def _did_you_mean(word: str, options: list[str]) -> str:
    near = get_close_matches(word, options, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _expand_home(raw: dict[str, Any]) -> dict[str, Any]:
    """``~`` in `model`/`models`/`output`. Nothing else: every relative path in a recipe (inputs, output, data
    files of steps) is relative to the current folder, like every path typed on the command line, not to the
    recipe file's folder."""

    def fix(p: str) -> str:
        return p if p.startswith("builtin:") else os.path.expanduser(p)

    out = dict(raw)
    if isinstance(out.get("model"), str):
        out["model"] = fix(out["model"])
    if isinstance(out.get("models"), dict):
        out["models"] = {k: fix(str(v)) for k, v in out["models"].items()}
    if isinstance(out.get("output"), str):
        out["output"] = fix(out["output"])
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """``steps.0.cast.dtype=bfloat16``: the path must exist up to its parent, values parsed as YAML."""
    from surgeon.registry import get_op

    if "=" not in assignment:
        raise SurgeonError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    path, _, text = assignment.partition("=")
    keys = path.split(".")
    # op names contain dots (steps.1.retrain.perp.data): fold them back into one key
    if len(keys) >= 3 and keys[0] == "steps" and keys[1].isdigit() and isinstance(raw.get("steps"), list):
        steps = raw["steps"]
        if int(keys[1]) < len(steps) and isinstance(steps[int(keys[1])], dict) and len(steps[int(keys[1])]) == 1:
            op = next(iter(steps[int(keys[1])]))
            n = len(op.split("."))
            if ".".join(keys[2:2 + n]) == op:
                keys = keys[:2] + [op] + keys[2 + n:]
    value = yaml.safe_load(text) if text else ""
    node: Any = raw
    for depth, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise SurgeonError(f"--set {path}: index {k!r} out of range (have {len(node)} items)")
            node = node[int(k)]
        elif isinstance(node, dict):
            if k not in node:
                raise SurgeonError(f"--set {path}: no key {k!r}{_did_you_mean(k, list(node))}")
            if node[k] is None:
                node[k] = {}
            node = node[k]
        else:
            raise SurgeonError(f"--set {path}: {'.'.join(keys[:depth])} is not a mapping or list")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise SurgeonError(f"--set {path}: index {last!r} out of range")
        node[int(last)] = value
        return
    if not isinstance(node, dict):
        raise SurgeonError(f"--set {path}: parent is not a mapping")
    if last not in node:
        allowed: list[str] = list(Recipe.model_fields) if len(keys) == 1 else []
        if len(keys) == 4 and keys[0] == "steps":  # steps.N.op.param: any field of the op's Params
            allowed = list(get_op(keys[2]).params.model_fields)
        if last not in allowed:
            raise SurgeonError(f"--set {path}: no key {last!r}{_did_you_mean(last, list(node) + allowed)}")
    node[last] = value


def load_recipe(source: str | os.PathLike | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Parse, apply ``--set`` overrides, and validate the recipe and every step's params (no tensor read)."""
    if isinstance(source, dict):
        raw, where = dict(source), "recipe"
    else:
        p = Path(source)
        if not p.is_file():
            raise SurgeonError(f"{p}: recipe file not found")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise SurgeonError(f"{p}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
        where = str(p)
        if not isinstance(raw, dict):
            raise SurgeonError(f"{p}: a recipe is a YAML mapping with `model`/`models`, `steps` and `output`")
    from surgeon.mergekit_config import is_mergekit_config, translate

    if is_mergekit_config(raw):
        raw = translate(raw, where=where)
    for a in overrides or []:
        apply_override(raw, a)
    unknown = [k for k in raw if k not in Recipe.model_fields]
    if unknown:
        raise SurgeonError(f"{where}: unknown key {unknown[0]!r}{_did_you_mean(unknown[0], list(Recipe.model_fields))}")
    raw = _expand_home(raw)
    try:
        recipe = Recipe(**raw)
    except ValidationError as e:
        from surgeon.pipeline import pydantic_message

        raise SurgeonError(pydantic_message(e, where)) from None
    from surgeon.pipeline import validate_step

    for i, step in enumerate(recipe.steps):
        (op, params), = step.items()
        params = dict(params or {})
        if recipe.arch and "arch" in _fields_of(op):
            params.setdefault("arch", recipe.arch)
        validate_step(op, params, where=f"{where}: steps.{i}.{op}")
    return recipe


def _fields_of(op: str) -> list[str]:
    from surgeon.registry import get_op

    return list(get_op(op).params.model_fields)


def recipe_models(recipe: Recipe) -> dict[str, str]:
    if recipe.model is not None:
        return {recipe.model: recipe.model}
    return dict(recipe.models or {})


def execute_recipe(recipe: Recipe, *, output: str | None = None, force: bool = False, dry_run: bool = False,
                   quiet: bool = False, device: str | None = None) -> dict[str, Any]:
    from surgeon.pipeline import RunOptions, run_steps

    steps = []
    for step in recipe.steps:
        (op, params), = step.items()
        params = dict(params or {})
        if recipe.arch and "arch" in _fields_of(op):  # ops with their own ``arch`` field see it there too
            params.setdefault("arch", recipe.arch)
        steps.append((op, params))
    opts = RunOptions(output=output or recipe.output, force=force, device=device or recipe.device,
                      seed=recipe.seed, max_shard_size=recipe.max_shard_size, quiet=quiet, dry_run=dry_run,
                      max_memory=recipe.max_memory, executor=recipe.executor,
                      allow_nonfinite=recipe.allow_nonfinite, record_paths=recipe.record_paths, arch=recipe.arch)
    result = run_steps(recipe_models(recipe), steps, opts, recipe=recipe.model_dump(mode="json", exclude_none=True),
                       base=recipe.base)
    if recipe.push is not None and not dry_run and result.get("output"):
        from surgeon.hub import push_folder

        result["push"] = push_folder(result["output"], recipe.push.repo_id, private=recipe.push.private,
                                     revision=recipe.push.revision, commit_message=recipe.push.commit_message)
    return result
