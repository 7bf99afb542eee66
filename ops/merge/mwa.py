"""MWA: metrics-weighted averaging of the checkpoints of one training run (Yu & Choi, arXiv 2504.18580; §3.2).

Each checkpoint i gets a score s_i (``1/loss_i`` with the logged loss nearest to its step, or its step) and a
weight ``w_i = s_i^pf / Σ_j s_j^pf`` (penalty factor pf; pf = 0 is the uniform mean). LoRA checkpoints are
averaged factor by factor (A and B separately, fine within one run where the factors share a gauge); with
``space: delta`` the deltas ``Σ w_i s B_i A_i`` are averaged exactly and re-factorised by a truncated SVD.
Full checkpoints are averaged tensor by tensor.

[verify] The weight formula is the reference sheet's reconstruction; the paper's method section could not be
read here (only its abstract: "a formula with a penalty factor ... one hyperparameter regardless of the number
of checkpoints"). See docs/merge.md.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from surgeon.ops.merge.classic import linear_merge
from surgeon.ops.merge.inputs import MergeParams, check_compatible, out_dtype

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Graph
from surgeon.registry import register

# ---------------------------------------------------------------------------------------------------------
# pure math


def mwa_weights(scores: list[float], penalty: float) -> list[float]:
    """w_i = s_i^pf / Σ_j s_j^pf (pf = 0: uniform). Scores must be positive."""
    if any(not (s > 0 and math.isfinite(s)) for s in scores):
        raise SurgeonError(f"merge mwa: scores must be positive and finite, got {scores}")
    logs = [penalty * math.log(s) for s in scores]  # in log space: large steps ** pf cannot overflow
    m = max(logs)
    raw = [math.exp(x - m) for x in logs]
    total = sum(raw)
    return [r / total for r in raw]


def refactorize(delta: torch.Tensor, rank: int, *, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD split ``delta ≈ B A`` with ``B = U√Σ`` [out, r], ``A = √Σ Vᵀ`` [r, in]."""
    from surgeon.kernels.linalg import svd

    u, s, vh = svd(delta.float(), device=device)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if r < rank:  # keep the declared rank: pad with zero directions
        b = torch.cat([b, torch.zeros(b.shape[0], rank - r)], 1)
        a = torch.cat([a, torch.zeros(rank - r, a.shape[1])], 0)
    return a, b


# ---------------------------------------------------------------------------------------------------------
# metrics


@dataclass
class CheckpointInfo:
    name: str
    folder: Path
    step: int
    metric: float | None = None
    metric_step: int | None = None  # the logged step whose value was used


_STEP = re.compile(r"checkpoint-(\d+)$")


def _trainer_state(folder: Path, ctx: Context) -> dict[str, Any] | None:
    ts = folder / "trainer_state.json"
    if not ts.is_file():
        return None
    state = ctx.read_json(str(ts), what="merge mwa")
    return state if isinstance(state, dict) else {}


def checkpoint_step(folder: Path, ctx: Context) -> int | None:
    """The training step of a checkpoint: ``global_step`` of its trainer_state.json, else ``checkpoint-<step>``."""
    state = _trainer_state(folder, ctx)
    step = state.get("global_step") if state is not None else None
    if isinstance(step, int):
        return step
    m = _STEP.search(folder.name)
    return int(m.group(1)) if m else None


def log_history(folders: list[Path], ctx: Context) -> list[dict[str, Any]]:
    """``log_history`` of the most complete ``trainer_state.json`` among the checkpoints (the latest one)."""
    best: list[dict[str, Any]] = []
    for f in folders:
        state = _trainer_state(f, ctx)
        if state is None:
            continue
        hist = state.get("log_history") or []
        if len(hist) >= len(best):
            best = hist
    return best


def read_metrics_csv(text: str, key: str, *, path: str) -> list[tuple[int, float]]:
    """(step, value) rows of a CSV ``text`` (read from ``path``) with a header holding ``step`` and ``key``."""
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "step" not in reader.fieldnames or key not in reader.fieldnames:
        raise SurgeonError(f"{path}: expected a header with columns 'step' and {key!r}, got {reader.fieldnames}")
    for i, row in enumerate(reader, start=2):
        try:
            rows.append((int(float(row["step"])), float(row[key])))
        except (TypeError, ValueError):
            raise SurgeonError(f"{path}: line {i}: step and {key} must be numbers") from None
    if not rows:
        raise SurgeonError(f"{path}: no rows")
    return rows


def nearest(points: list[tuple[int, float]], step: int) -> tuple[int, float]:
    """The logged (step, value) nearest to ``step`` (the earlier one on a tie)."""
    return min(points, key=lambda p: (abs(p[0] - step), p[0]))


# ---------------------------------------------------------------------------------------------------------
# op


class MwaParams(MergeParams):
    metric: Literal["loss", "step"] = Field("loss", description=(
        "Score of a checkpoint: 1/loss (the logged loss nearest to its step) or its training step."))
    metric_key: str = Field("loss", description="Which logged value is the loss (e.g. loss, eval_loss).")
    penalty: float = Field(1.0, ge=0, description="Penalty factor pf: w_i ∝ score_i^pf (0 = uniform mean).")
    metrics_file: str | None = Field(None, description=(
        "CSV with columns step and <metric-key> instead of the checkpoints' trainer_state.json."))
    window: int | None = Field(None, ge=1, description="Use only the last N checkpoints (by step).")
    stride: int = Field(1, ge=1, description="Take every k-th checkpoint counting back from the last.")
    space: Literal["factors", "delta"] = Field("factors", description=(
        "LoRA checkpoints: average A and B separately (factors) or average s·B·A and re-factorise by SVD (delta)."))
    rank: int | None = Field(None, ge=1, description="Rank of the re-factorised adapter with --space delta (default: the input rank).")

    @field_validator("metric_key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v


def _folder_of(g: Graph) -> Path:
    p = Path(g.sources[0].path) if g.sources else Path(".")
    return p if p.is_dir() else p.parent


def resolve_checkpoints(names: list[str], graphs: dict[str, Graph], params: MwaParams,
                        ctx: Context) -> list[CheckpointInfo]:
    """Steps and metric values of the checkpoints, sorted by step, windowed."""
    infos = []
    for n in names:
        folder = _folder_of(graphs[n])
        step = checkpoint_step(folder, ctx)
        if step is None:
            raise SurgeonError(f"merge mwa: {n}: no trainer_state.json and no checkpoint-<step> folder name; "
                               "cannot tell its training step")
        infos.append(CheckpointInfo(n, folder, step))
    infos.sort(key=lambda c: c.step)
    if len({c.step for c in infos}) != len(infos):
        raise SurgeonError("merge mwa: two checkpoints have the same step (not one training run?)")
    picked = infos[::-1][:: params.stride]
    if params.window is not None:
        picked = picked[: params.window]
    infos = picked[::-1]
    if params.metric == "loss":
        if params.metrics_file is not None:
            text = ctx.read_text(params.metrics_file, what="--metrics-file")
            points = read_metrics_csv(text, params.metric_key, path=params.metrics_file)
            source = params.metrics_file
        else:
            hist = log_history([c.folder for c in infos], ctx)
            if not hist:
                raise SurgeonError(f"merge mwa: {infos[-1].name}: missing trainer_state.json with a log_history "
                                   "(pass --metrics-file CSV or --metric step)")
            points = [(int(e["step"]), float(e[params.metric_key])) for e in hist
                      if params.metric_key in e and "step" in e]
            source = "trainer_state.json"
            if not points:
                raise SurgeonError(f"merge mwa: no {params.metric_key!r} entries in trainer_state.json log_history")
        for c in infos:
            c.metric_step, c.metric = nearest(points, c.step)
            if c.metric <= 0:
                raise SurgeonError(f"merge mwa: {c.name}: {params.metric_key} {c.metric} at step {c.metric_step} is "
                                   f"not positive ({source}); loss weighting needs positive losses")
    return infos


def _is_adapter(g: Graph) -> bool:
    return any(".lora_A" in n or ".lora_embedding_A" in n for n in g.names())


def _adapter_config(folder: Path, ctx: Context) -> dict[str, Any]:
    p = folder / "adapter_config.json"
    if not p.is_file():
        raise SurgeonError(f"{folder}: LoRA weights without adapter_config.json")
    return ctx.read_json(str(p), what="merge mwa")


@register("merge.mwa", MwaParams, multi_model=True,
          summary="Metrics-weighted averaging of checkpoints of one run (arXiv 2504.18580).")
def merge_mwa(graph: Graph, params: MwaParams, ctx: Context) -> Graph:
    """Metrics-weighted average of the checkpoints of one run."""
    op = "merge mwa"
    graphs = dict(ctx.graphs) or {"model": graph}
    names = list(params.models) or [n for n in graphs if n != (params.base or ctx.base_name)]
    for n in names:
        if n not in graphs:
            raise SurgeonError(f"{op}: model {n!r} is not among the input models")
    infos = resolve_checkpoints(names, graphs, params, ctx)
    if len(infos) < 2:
        raise SurgeonError(f"{op}: needs at least 2 checkpoints after windowing, got {len(infos)}")
    scores = [1.0 / c.metric if params.metric == "loss" else float(c.step) for c in infos]  # type: ignore[operator]
    weights = mwa_weights(scores, params.penalty)
    chosen = [graphs[c.name] for c in infos]
    adapters = [_is_adapter(g) for g in chosen]
    if any(adapters) and not all(adapters):
        raise SurgeonError(f"{op}: mixing LoRA checkpoints and full checkpoints")
    from surgeon.ops.merge.inputs import MergeInputs

    inputs = MergeInputs([c.name for c in infos], chosen, None, None, chosen[-1], ctx=ctx)
    plan = check_compatible(inputs, params, op=op)
    table = [{"checkpoint": c.name, "step": c.step, "metric_step": c.metric_step, params.metric_key: c.metric,
              "score": s, "weight": w} for c, s, w in zip(infos, scores, weights)]
    mwa_json: dict[str, Any] = {"method": "mwa", "metric": params.metric, "metric_key": params.metric_key,
                                "penalty": params.penalty, "window": params.window, "stride": params.stride,
                                "space": params.space, "checkpoints": table}
    g = chosen[-1].copy()
    g.side_files = {k: v for k, v in g.side_files.items() if Path(k).name not in ("trainer_state.json",)}
    if all(adapters):
        configs = [_adapter_config(_folder_of(x), ctx) for x in chosen]
        for key in ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern"):
            vals = {json.dumps(c.get(key), sort_keys=True) for c in configs}
            if len(vals) > 1:
                raise SurgeonError(f"{op}: checkpoints differ in adapter_config {key!r} ({sorted(vals)}); "
                                   "MWA averages checkpoints of one run")
        cfg = dict(configs[-1])
        if params.space == "delta":
            cfg = _delta_space(g, inputs, plan, weights, params, ctx, cfg)
        else:
            if params.rank is not None:
                raise SurgeonError(f"{op}: --rank only applies with --space delta")
            _wire_linear(g, inputs, plan, weights, params)
        ctx.attach(g, "adapter_config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        g.weight_stems[""] = "adapter_model"
    else:
        if params.space == "delta":
            raise SurgeonError(f"{op}: --space delta needs LoRA checkpoints")
        _wire_linear(g, inputs, plan, weights, params)
    ctx.attach(g, "mwa.json", json.dumps(mwa_json, indent=2) + "\n")
    g.tags = sorted(set(g.tags) | {"merge", "mwa"})
    ctx.report(method="mwa", weights={c.name: w for c, w in zip(infos, weights)}, checkpoints=table,
               penalty=params.penalty, metric=params.metric, space=params.space)
    ctx.log("mwa weights: " + ", ".join(f"{c.name} (step {c.step}) {w:.4f}" for c, w in zip(infos, weights)))
    return g


def _wire_linear(g: Graph, inputs, plan: dict[str, str], weights: list[float], params: MwaParams) -> None:
    for t, kind in plan.items():
        if kind != "merge":
            continue
        node = inputs.primary[t]
        g.replace(t, Apply(lambda *vals: linear_merge(vals, weights), [m[t] for m in inputs.graphs],
                           label="merge-mwa", dtype=out_dtype(params, node)))


_FACTOR = re.compile(r"^(?P<module>.+)\.lora_A(?P<tail>(?:\.[^.]+)?\.weight)$")


def _delta_space(g: Graph, inputs, plan: dict[str, str], weights: list[float], params: MwaParams, ctx: Context,
                 cfg: dict[str, Any]) -> dict[str, Any]:
    """Average s·B_i·A_i per module and re-factorise at rank r; scale folded (lora_alpha = r, s = 1)."""
    from surgeon.lora import pattern_value

    if any("lora_embedding" in t for t in plan):
        raise SurgeonError("merge mwa: --space delta supports Linear LoRA only (this adapter has embedding LoRA)")
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))
    new_ranks: dict[str, int] = {}
    for a_name in [t for t in plan if _FACTOR.match(t)]:
        m = _FACTOR.match(a_name)
        assert m is not None
        b_name = f"{m.group('module')}.lora_B{m.group('tail')}"
        if b_name not in plan:
            raise SurgeonError(f"merge mwa: {a_name!r} has no matching {b_name!r}")
        module = m.group("module").removeprefix("base_model.model.")
        r_in = int(inputs.primary[a_name].shape[0])
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
        s = alpha / math.sqrt(r_in) if rslora else alpha / r_in
        rank = params.rank or r_in
        new_ranks[module] = rank
        out_dim, in_dim = inputs.primary[b_name].shape[0], inputs.primary[a_name].shape[1]
        srcs = [x for gr in inputs.graphs for x in (gr[a_name], gr[b_name])]

        def pack(*vals, s=s, rank=rank, out_dim=out_dim):
            delta = torch.zeros(out_dim, vals[0].shape[1])
            for w, (a, b) in zip(weights, zip(vals[0::2], vals[1::2])):
                delta.addmm_(b.float(), a.float(), alpha=w * s)
            a_new, b_new = refactorize(delta, rank, device=ctx.device)
            return torch.cat([b_new, a_new.T], 0)  # [out + in, r]: one SVD feeds both factors

        packed = Apply(pack, srcs, label="mwa-delta", shape=(out_dim + in_dim, rank), dtype=torch.float32)
        dt_a, dt_b = out_dtype(params, inputs.primary[a_name]), out_dtype(params, inputs.primary[b_name])
        g.replace(b_name, Apply(lambda p, o=out_dim: p[:o], [packed], label="mwa-B", shape=(out_dim, rank),
                                dtype=dt_b))
        g.replace(a_name, Apply(lambda p, o=out_dim: p[o:].T.contiguous(), [packed], label="mwa-A",
                                shape=(rank, in_dim), dtype=dt_a))
    for t, kind in plan.items():  # anything else (modules_to_save): plain weighted average
        if kind == "merge" and ".lora_" not in t:
            g.replace(t, Apply(lambda *vals: linear_merge(vals, weights), [m[t] for m in inputs.graphs],
                               label="merge-mwa", dtype=out_dtype(params, inputs.primary[t])))
    ranks = set(new_ranks.values())
    r_out = max(ranks, key=lambda k: sum(1 for v in new_ranks.values() if v == k)) if ranks else r_default
    rank_pattern = {m: v for m, v in new_ranks.items() if v != r_out}
    cfg = dict(cfg)
    cfg.update({"r": r_out, "lora_alpha": r_out, "use_rslora": False, "rank_pattern": rank_pattern,
                "alpha_pattern": {m: float(v) for m, v in rank_pattern.items()}})
    return cfg
