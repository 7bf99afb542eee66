"""``merge revert``: rebuild one task of an RMM merge (:mod:`surgeon.ops.merge.rmm`) as a PEFT LoRA adapter or,
with ``--base``, a dense model (arXiv 2510.14163; ALGORITHMS.md §3.4).

Task i's factors are x̂_i = μ + M c_i at every position (rows of B, columns of A), read from ``rmm.safetensors``
with the layout recorded in ``rmm.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from surgeon.ops.merge.inputs import MergeParams
from surgeon.ops.merge.rmm import RMM_JSON, rmm_revert

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Const, Graph, LowRank
from surgeon.registry import register


class RevertParams(MergeParams):
    task: str = Field(..., description="Task to rebuild: its name in rmm.json (path, folder name) or 0-based index.")
    form: Literal["adapter", "dense"] = Field("adapter", description=(
        "adapter: a PEFT LoRA folder (scale folded, lora_alpha = r); dense: base + B̂Â (needs --base)."))




def _rmm_meta(g: Graph, ctx: Context) -> dict[str, Any] | None:
    src = g.side_files.get(RMM_JSON)
    if src is None:
        return None
    return ctx.read_json(str(src), what="merge revert")


def _task_index(meta: dict[str, Any], task: str) -> int:
    tasks, folders = meta["tasks"], meta.get("task_folders", [])
    for i, (t, f) in enumerate(zip(tasks, folders or tasks)):
        if task in (t, f) or Path(t).name == task:
            return i
    if task.isdigit() and int(task) < len(tasks):
        return int(task)
    raise SurgeonError(f"merge revert: no task {task!r} in this RMM merge (tasks: {', '.join(folders or tasks)})")


def revert_factors(g: Graph, meta: dict[str, Any], i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{tensor: (Â [r, in], B̂ [out, r])} for task i, in the Linear orientation of W."""
    out = {}
    for t in meta["modules"]:
        parts = {}
        for side in ("B", "A"):
            basis = g.value(f"{t}::{side}.basis")
            coeffs = g.value(f"{t}::{side}.coeffs")
            mean = g.value(f"{t}::{side}.mean") if f"{t}::{side}.mean" in g else None
            x = rmm_revert(basis, coeffs, mean, i)
            rows = meta["modules"][t]["shape"][0 if side == "B" else 1]
            parts[side] = x.reshape(rows, -1)
        out[t] = (parts["A"].T.contiguous(), parts["B"].contiguous())
    return out


def adapter_form(rg: Graph, meta: dict[str, Any], facs: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                 op: str) -> tuple[Graph, dict[str, Any]]:
    """Task factors as a PEFT LoRA graph and its ``adapter_config.json`` (scale folded into B, ``lora_alpha = r``)."""
    from surgeon.lora import PREFIX, adapter_config, module_of

    tensors: dict[str, torch.Tensor] = {}
    for t, (a, b) in facs.items():
        info = meta["modules"][t]
        mod = module_of(t)
        if info["kind"] == "embedding":  # PEFT stores (B_e A_e)ᵀ: A_e = B̂ᵀ, B_e = Âᵀ
            tensors[f"{PREFIX}{mod}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{PREFIX}{mod}.lora_embedding_B"] = a.T.contiguous()
        else:
            tensors[f"{PREFIX}{mod}.lora_A.weight"] = a
            tensors[f"{PREFIX}{mod}.lora_B.weight"] = b
    for t in meta.get("dense_deltas", []):
        raise SurgeonError(f"{op}: this merge holds dense deltas ({t!r}, from full fine-tunes); "
                           "revert it with --form dense --base BASE")
    src_cfg = meta.get("adapter_config") or {}
    r = int(meta["r"][0])
    fif = any(m["transposed"] for m in meta["modules"].values())
    cfg = adapter_config(base_model=src_cfg.get("base_model_name_or_path") or meta.get("base"),
                         target_modules=src_cfg.get("target_modules") or sorted({module_of(t).rsplit(".", 1)[-1]
                                                                                  for t in facs}),
                         r=r, alpha=r, fan_in_fan_out=fif, task_type=src_cfg.get("task_type", "CAUSAL_LM"))
    out = Graph({k: Const(v, label="rmm-revert") for k, v in tensors.items()}, configs={},
                weight_stems={"": "adapter_model"}, base_model=rg.base_model)
    return out, cfg


def dense_form(rg: Graph, meta: dict[str, Any], facs: dict[str, tuple[torch.Tensor, torch.Tensor]], i: int,
               base: Graph, *, op: str) -> Graph:
    """The base with task i's low-rank delta B̂Â (and its dense 1-D deltas) added lazily."""
    out = base.copy()
    for t, (a, b) in facs.items():
        if t not in base:
            raise SurgeonError(f"{op}: tensor {t!r} of the RMM merge is not in the base model")
        info = meta["modules"][t]
        shape = tuple(base[t].shape)
        want = tuple(info["shape"]) if not info["transposed"] else tuple(info["shape"][::-1])
        if shape != want:
            raise SurgeonError(f"{op}: tensor {t!r} is {list(shape)} in the base, the merge expects {list(want)}")
        out.replace(t, LowRank(base[t], b, a, transposed=bool(info["transposed"]), label="rmm-revert"))
    for t in meta.get("dense_deltas", []):
        d = rg.value(f"{t}::delta.{i}")
        out.replace(t, Apply(lambda w, d=d: w.float() + d, [base[t]], label="rmm-revert"))
    return out


@register("merge.revert", RevertParams, multi_model=True,
          summary="Rebuild one task's adapter or model from an RMM merge.")
def merge_revert(graph: Graph, params: RevertParams, ctx: Context) -> Graph:
    """Rebuild one task of an RMM merge as a PEFT adapter or a dense model."""
    op = "merge revert"
    graphs = dict(ctx.graphs) or {"rmm": graph}
    names = list(params.models) or [n for n in graphs if n != (params.base or ctx.base_name)]
    found = [(n, graphs[n], _rmm_meta(graphs[n], ctx)) for n in names if n in graphs]
    found = [x for x in found if x[2] is not None]
    if not found:
        raise SurgeonError(f"{op}: none of {names} is an RMM merge output (no {RMM_JSON})")
    _name, rg, meta = found[0]
    i = _task_index(meta, params.task)
    facs = revert_factors(rg, meta, i)
    task = meta["tasks"][i]
    if params.form == "adapter":
        out, cfg = adapter_form(rg, meta, facs, op=op)
        ctx.attach(out, "adapter_config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    else:
        base_name = params.base or ctx.base_name
        if base_name is None or base_name not in graphs:
            raise SurgeonError(f"{op}: --form dense needs the base model (--base BASE)")
        out = dense_form(rg, meta, facs, i, graphs[base_name], op=op)
    out.tags = sorted(set(out.tags) | {"rmm-revert"})
    ctx.report(method="rmm-revert", task=task, form=params.form,
               relative_error=meta.get("relative_error", {}).get(task))
    return out
