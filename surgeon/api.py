"""The Python face: the same code path as the CLI and recipes.

>>> from surgeon.api import run_op
>>> run_op("prune.magnitude", "./model", output="./pruned", sparsity=0.5)["output"]  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any

from surgeon.pipeline import RunOptions, run_steps


def run_op(op: str, model: str | os.PathLike | list[str] | dict[str, str], *, output: str | os.PathLike | None = None,
           base: str | None = None, force: bool = False, device: str = "auto", seed: int = 0,
           quiet: bool = True, max_shard_size: str | int = "auto", max_memory: str | int | None = None,
           executor: str = "local", record_paths: bool = False, **params: Any) -> dict[str, Any]:
    """Run one registered op on ``model`` (a path; a list or ``{name: path}`` for merges) and write ``output``."""
    if isinstance(model, dict):
        models = {str(k): str(v) for k, v in model.items()}
    elif isinstance(model, (list, tuple)):
        models = {str(m): str(m) for m in model}
    else:
        models = {str(model): str(model)}
    if base is not None:
        models = {str(base): str(base), **models} if str(base) not in models else models
        params.setdefault("base", str(base))
    opts = RunOptions(output=None if output is None else str(output), force=force, device=device, seed=seed,
                      quiet=quiet, max_shard_size=max_shard_size, max_memory=max_memory, executor=executor,
                      record_paths=record_paths)
    return run_steps(models, [(op, params)], opts, base=None if base is None else str(base))


def run_recipe(recipe: str | os.PathLike | dict[str, Any], *, output: str | None = None,
               overrides: list[str] | None = None, force: bool = False, dry_run: bool = False,
               quiet: bool = True) -> dict[str, Any]:
    """Run a YAML recipe (path or already-parsed dict)."""
    from surgeon.recipe import execute_recipe, load_recipe

    r = load_recipe(recipe, overrides or [])
    return execute_recipe(r, output=output, force=force, dry_run=dry_run, quiet=quiet)
