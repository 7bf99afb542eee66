"""CheckFree / CheckFree+: rebuild a lost pipeline stage of a checkpoint from its neighbours.

Blagoev, Ersoy & Chen, "CheckFree: Fault-Tolerant Training without Checkpoints", arXiv 2506.15461; reference
code ``gensyn-ai/CheckFree``. In pipeline-parallel training a stage (a run of contiguous layers) that is lost is
re-initialised as the gradient-norm-weighted average of its two neighbouring stages (Sec. 3, Eq. 1). CheckFree+
trains with the first two and the last two stages swapped on alternate micro-batches, so a lost first, second,
penultimate or last stage is a copy of its swap partner (the reference's ``ours-grad-avg`` branch). Plain
CheckFree cannot rebuild an edge stage from neighbours; the reference restores it from a periodic copy, here
``edge_copy`` (an earlier checkpoint). Offline, the
result is **an initialisation for continued training**, not a restored model: resume with a fresh optimizer state
for the stage and a slightly higher learning rate (the paper's runs use ×1.1).

Rules we apply (and write into ``recovery.json``):
- stage partition: ``stages`` equal parts, or explicit inclusive ranges ``0-4,5-9``;
- lost stages: ``lost``, or detected (tensors missing, NaN/Inf, all zeros); detection is reported, and a
  corrupt stage not named in ``lost`` is an error rather than a silent repair;
- layer j of a stage of n layers takes layer ⌊(j + ½)·m/n⌋ of a neighbour with m layers (centre alignment; the
  identity for equal stages);
- refused: a lost stage whose source stage is lost too, an edge stage without ``plus`` or ``edge_copy``, a lost
  embedding/head without a replica, neighbours whose tensors differ in shape.

Modules: :mod:`.stages` (partition, sources, alignment, Eq. 1, weights), this module (layout, detection, the op).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from surgeon.ops.recover.stages import (
    aligned_layer,
    checkfree_average,
    grad_norms_from,
    recovery_sources,
    stage_partition,
)

from surgeon.errors import SurgeonError
from surgeon.registry import register

if TYPE_CHECKING:
    import torch

    from surgeon.context import Context
    from surgeon.graph import Graph, Node


#: the reference adds this to each gradient norm so a zero norm never zeroes a neighbour's weight
GRAD_EPS = 1e-4
LR_FACTOR = 1.1
CARD_NOTE = ("Weights of the recovered stage(s) are synthetic (CheckFree reconstruction from neighbouring "
             "stages): this checkpoint is an initialisation for continued training, not a restored model. Resume "
             "with a fresh optimizer state for the recovered stage(s) and the learning rate × 1.1 (Blagoev et al., "
             "arXiv 2506.15461). Details in recovery.json.")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: int | None = Field(None, ge=1, description="Number of pipeline stages; the layers are split equally "
                                                        "(an uneven split needs --stage-layers).")
    stage_layers: list[str] = Field(default_factory=list, description="Explicit stage ranges of layers, "
                                    "inclusive, in order, covering every layer: e.g. 0-4,5-9,10-11.")
    lost: list[int] = Field(default_factory=list, description="Indices of the lost stages (0-based). Empty = "
                            "detect: stages whose tensors are missing, NaN/Inf or all zeros.")
    weights: str | None = Field(None, description="JSON file of per-stage gradient norms (a list indexed by "
                                "stage, or {stage: norm}, optionally under 'grad_norms'); neighbours are "
                                "weighted by norm + 1e-4 as in the reference. Default: uniform.")
    plus: bool = Field(False, description="CheckFree+: the first/second and penultimate/last stages are swap "
                       "partners and a lost one is copied from its partner, as the reference code (the model must "
                       "have been trained with those stages swapped); middle stages are averaged.")
    edge_copy: str | None = Field(None, description="Plain CheckFree: an earlier checkpoint (folder or file) whose "
                                  "copy of a lost first/last stage replaces it (the reference restores edge stages "
                                  "from a copy taken every 100 iterations); the copy is stale by design.")
    replicas: dict[str, str] = Field(default_factory=dict, description="Extra replica pairs lost_tensor=source "
                                     "for global tensors (embeddings, final norm) beyond a tied embedding/head.")
    scan: bool = Field(True, description="Read every layer tensor once to detect NaN/Inf/all-zero stages "
                       "(missing tensors are always detected).")

    @field_validator("stage_layers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("stage_layers")
    @classmethod
    def _ranges(cls, v: list[str]) -> list[str]:
        for part in v:
            if not re.fullmatch(r"\d+(-\d+)?", part):
                raise ValueError(f"stage_layers: expected inclusive ranges like 0-4, got {part!r}")
        return v

    @field_validator("replicas", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        if isinstance(v, str):
            out = {}
            for part in filter(None, (p.strip() for p in v.split(","))):
                k, sep, src = part.partition("=")
                if not sep:
                    raise ValueError(f"replicas: expected lost=source pairs, got {part!r}")
                out[k.strip()] = src.strip()
            return out
        return v

    @field_validator("lost")
    @classmethod
    def _lost(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v):
            raise ValueError("lost: stage indices are 0-based and non-negative")
        if len(set(v)) != len(v):
            raise ValueError(f"lost: repeated stage in {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _partition_given(self) -> Params:
        if (self.stages is None) == (not self.stage_layers):
            raise ValueError("give exactly one of stages (equal split) or stage_layers (explicit ranges)")
        if self.plus and self.edge_copy:
            raise ValueError("plus and edge_copy are exclusive: CheckFree+ copies edge stages from their swap "
                             "partners, plain CheckFree from the earlier checkpoint")
        return self


# layout of a possibly damaged checkpoint -----------------------------------------------------------------------
@dataclass
class Layout:
    n_layers: int
    layer_prefix: str  # template with {i}
    suffixes: list[str]  # layer-relative names of a complete layer, in order
    present: list[set[str]]  # suffixes present per layer
    globals_: dict[str, str | None] = field(default_factory=dict)  # embed, lm_head, final_norm, pos_embed
    tied: bool = False

    def name(self, i: int, suffix: str) -> str:
        return self.layer_prefix.format(i=i) + suffix


def read_layout(graph: Graph, ctx: Context) -> Layout:
    """The layer template and the complete block from the layers that survived (:func:`surgeon.arch.gaps.roles_with_gaps`,
    with the run's ``arch:`` overrides), and the global tensors expected."""
    from surgeon.arch.gaps import roles_with_gaps

    try:
        gapped = roles_with_gaps(graph.config, graph.names(), ctx.arch or None)
    except SurgeonError as e:
        raise SurgeonError(f"recover: {e}") from None
    tied = bool(graph.config.get("tie_word_embeddings", gapped.roles.tied))
    wanted = {"embed": True, "final_norm": True, "lm_head": not tied, "pos_embed": False}
    globals_ = {role: gapped.global_name(role) if needed else getattr(gapped.roles, role)
                for role, needed in wanted.items()}
    if tied and "lm_head.weight" in graph:
        globals_["lm_head"] = "lm_head.weight"  # a stored copy of a tied head is the embedding's replica
    return Layout(len(gapped.present), gapped.template, gapped.suffixes, gapped.present, globals_, tied)


# detection ---------------------------------------------------------------------------------------------------
def _raw_value(graph: Graph, name: str) -> torch.Tensor:
    """A tensor as stored, NaN/Inf included (the checkpoint reader refuses those by default; here we look for them)."""
    from surgeon.graph import Load

    node = graph[name]
    if isinstance(node, Load):
        return node.checkpoint.load(node.name, check=False)
    return graph.value(name)


def _corruption(t: torch.Tensor) -> str | None:
    import torch

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return "nonfinite"
    if t.numel() > 1 and not bool(t.any()):
        return "zero"
    return None


def detect_damage(graph: Graph, layout: Layout, partition: list[list[int]], scan: bool,
                  progress=None) -> dict[int, dict[str, Any]]:
    """Stages with missing or corrupt (NaN/Inf, all-zero) tensors: ``{stage: {reason: [tensor names]}}``."""
    damaged: dict[int, dict[str, Any]] = {}
    items = [(s, l) for s, layers in enumerate(partition) for l in layers]
    it = progress(items, len(items), "recover: scanning stages") if progress is not None and scan else items
    for s, l in it:
        for suffix in layout.suffixes:
            name = layout.name(l, suffix)
            reason = None
            if suffix not in layout.present[l]:
                reason = "missing"
            elif scan:
                reason = _corruption(_raw_value(graph, name))
            if reason:
                damaged.setdefault(s, {}).setdefault(reason, []).append(name)
    return damaged


# op ----------------------------------------------------------------------------------------------------------
def _average_node(prev: Node, nxt: Node, w_prev: float, w_next: float, label: str) -> Node:
    from surgeon.graph import Apply

    return Apply(lambda a, b: checkfree_average(a, b, w_prev, w_next), [prev, nxt], label=label)


@register("recover", Params, summary="CheckFree: rebuild a lost pipeline stage from its neighbours.")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Rebuild lost pipeline stages from their neighbours (CheckFree), or edges by copy (CheckFree+)."""
    layout = read_layout(graph, ctx)
    partition = stage_partition(layout.n_layers, params.stages, params.stage_layers)
    n_stages = len(partition)
    for s in params.lost:
        if s >= n_stages:
            raise SurgeonError(f"recover --lost {s}: the partition has {n_stages} stages (0-{n_stages - 1})")
    norms = (grad_norms_from(ctx.read_json(params.weights, what="--weights"), n_stages,
                             f"--weights: {params.weights}") if params.weights else None)
    damaged = detect_damage(graph, layout, partition, params.scan, progress=ctx.progress)
    warnings: list[str] = []
    lost = _lost_stages(params, damaged, warnings, ctx)
    if n_stages < 2:
        raise SurgeonError("recover: a single stage has no neighbour to rebuild it from")
    source_of = _sources_of(lost, n_stages, params)
    edges = [s for s, srcs in source_of.items() if srcs is None]
    stale = _open_edge_copy(ctx, params.edge_copy) if edges and params.edge_copy else None
    if params.edge_copy and not edges:
        warnings.append(f"--edge-copy {params.edge_copy} unused: no edge stage is lost")

    def weight(s: int) -> float:
        if norms is None:
            return 1.0
        if s not in norms:
            raise SurgeonError(f"{params.weights}: no gradient norm for stage {s} (a neighbour of a lost stage)")
        return norms[s] + GRAD_EPS

    new_nodes: dict[str, Node] = {}
    plans: list[dict[str, Any]] = []
    for s in lost:
        if source_of[s] is None:
            assert stale is not None
            plans.append(_restore_edge(stale, params.edge_copy or "", layout, graph, s, partition[s], new_nodes))
            warnings.append(f"stage {s} restored from the earlier checkpoint {params.edge_copy} (stale copy)")
        else:
            sources = [(src, weight(src) if len(source_of[s]) == 2 else 1.0) for src in source_of[s]]
            plans.append(_rebuild_stage(graph, layout, partition, s, sources, new_nodes))
    globals_done = _recover_globals(graph, layout, params, new_nodes, warnings)
    out = graph.copy()
    out.reorder(_model_order(graph, layout, new_nodes), new=new_nodes)
    report = {
        "method": "CheckFree+ (arXiv 2506.15461)" if params.plus else "CheckFree (arXiv 2506.15461)",
        "edge_copy": params.edge_copy,
        "partition": [[ls[0], ls[-1]] for ls in partition], "lost": lost,
        "detected": {str(s): {r: {"count": len(v), "tensors": v[:8]} for r, v in d.items()}
                     for s, d in sorted(damaged.items())},
        "weights": "uniform" if norms is None else {"file": params.weights, "grad_norms": norms, "eps": GRAD_EPS},
        "alignment": "layer j of an n-layer stage <- layer floor((j + 1/2) * m / n) of an m-layer neighbour",
        "stages": plans, "globals": globals_done, "warnings": warnings,
        "advice": {"optimizer": "fresh state for the recovered stage(s)", "lr_factor": LR_FACTOR,
                   "note": "an initialisation for continued training, not a restored model"},
    }
    ctx.attach(out, "recovery.json", json.dumps(report, indent=2) + "\n")
    out.tags.append("checkfree")
    for w in warnings:
        ctx.log(f"recover: warning: {w}")
    ctx.report(recover={"lost": lost, "plus": params.plus, "stages": n_stages,
                        "coefficients": {str(p["stage"]): p["coefficients"] for p in plans},
                        "warnings": warnings}, card_notes=[CARD_NOTE])
    return out


def _open_edge_copy(ctx: Context, path: str) -> Graph:
    """The earlier checkpoint of plain CheckFree's edge restore, read lazily."""
    from surgeon.graph import Graph

    return Graph.from_checkpoint(ctx.open_source(path))


def _lost_stages(params: Params, damaged: dict[int, dict[str, Any]], warnings: list[str], ctx: Context
                 ) -> list[int]:
    """The stages to rebuild: ``--lost`` (every damaged stage must be listed), or the detected ones."""
    if params.lost:
        unlisted = sorted(set(damaged) - set(params.lost))
        if unlisted:
            raise SurgeonError("recover: stage(s) " + ", ".join(
                f"{s} ({_describe(damaged[s])})" for s in unlisted) + " are damaged but not in --lost; add them "
                "to --lost (or leave --lost empty to use detection)")
        for s in params.lost:
            if s not in damaged:
                warnings.append(f"stage {s} is listed as lost but its tensors look intact; replaced anyway")
        return list(params.lost)
    lost = sorted(damaged)
    if not lost:
        raise SurgeonError("recover: no lost stage given and none detected (no missing, NaN/Inf or all-zero "
                           "layer tensors" + ("" if params.scan else "; --no-scan skips NaN/zero checks") + ")")
    ctx.log("recover: detected lost stage(s) " + "; ".join(f"{s}: {_describe(damaged[s])}" for s in lost))
    return lost


def _sources_of(lost: list[int], n_stages: int, params: Params) -> dict[int, list[int] | None]:
    """The source stages of each lost stage, refusing lost sources and edges without a way to restore them."""
    source_of = {s: recovery_sources(s, n_stages, params.plus) for s in lost}
    for s, srcs in source_of.items():
        for src in srcs or ():
            if src in lost:
                raise SurgeonError(f"recover: stages {min(s, src)} and {max(s, src)} are both lost; stage {s} is "
                                   f"rebuilt from stage {src}, which must be intact (rebuilding from a rebuilt stage "
                                   f"would compound the error)")
    edges = [s for s, srcs in source_of.items() if srcs is None]
    if edges and not params.edge_copy:
        raise SurgeonError(f"recover: stage {edges[0]} is an edge stage ({'first' if edges[0] == 0 else 'last'}) "
                           f"and has only one neighbour; give --edge-copy with an earlier checkpoint (the "
                           f"reference restores edges from a periodic copy) or --plus (CheckFree+: copy from the "
                           f"swap partner, sound only for models trained with swapped stages)")
    return source_of


def _rebuild_stage(graph: Graph, layout: Layout, partition: list[list[int]], s: int,
                   sources: list[tuple[int, float]], new_nodes: dict[str, Node]) -> dict[str, Any]:
    """Stage ``s`` from its neighbours (two: Eq. 1 average) or its swap partner (one: a copy); fills ``new_nodes``
    and returns the stage's entry of recovery.json."""
    layers = partition[s]
    total = sum(w for _, w in sources)
    entry: dict[str, Any] = {"stage": s, "layers": layers,
                             "mode": "average" if len(sources) == 2 else "copy of swap partner (CheckFree+)",
                             "sources": [src for src, _ in sources],
                             "coefficients": [w / total for _, w in sources], "layer_sources": []}
    for j, l in enumerate(layers):
        srcs = [partition[src][aligned_layer(j, len(layers), len(partition[src]))] for src, _ in sources]
        entry["layer_sources"].append({"layer": l, "from": srcs})
        for suffix in layout.suffixes:
            name = layout.name(l, suffix)
            src_nodes = []
            for sl in srcs:
                src_name = layout.name(sl, suffix)
                if src_name not in graph:
                    raise SurgeonError(f"recover: neighbour tensor {src_name} (source for {name}) is missing")
                src_nodes.append(graph[src_name])
            if name in graph and graph[name].shape != src_nodes[0].shape:
                raise SurgeonError(f"recover: {name} has shape {list(graph[name].shape)}, its source "
                                   f"{layout.name(srcs[0], suffix)} {list(src_nodes[0].shape)}")
            if len(src_nodes) == 2 and src_nodes[0].shape != src_nodes[1].shape:
                raise SurgeonError(f"recover: neighbours {layout.name(srcs[0], suffix)} "
                                   f"{list(src_nodes[0].shape)} and {layout.name(srcs[1], suffix)} "
                                   f"{list(src_nodes[1].shape)} differ in shape; cannot average")
            if len(src_nodes) == 1:
                new_nodes[name] = src_nodes[0]
            else:
                (_, w0), (_, w1) = sources
                new_nodes[name] = _average_node(src_nodes[0], src_nodes[1], w0, w1, label="recover.checkfree")
    return entry


def _model_order(graph: Graph, layout: Layout, new_nodes: dict[str, Node]) -> list[str]:
    """The source order, with every layer tensor (added ones included) in layer order where the layers start."""
    order = list(graph.names()) + [n for n in new_nodes if n not in graph]
    layer_rank = {layout.name(l, s): (l, k) for l in range(layout.n_layers) for k, s in enumerate(layout.suffixes)}
    first_layer_pos = next((i for i, n in enumerate(order) if n in layer_rank), len(order))
    layer_names = sorted((n for n in order if n in layer_rank), key=lambda n: layer_rank[n])
    position = {n: i for i, n in enumerate(order)}
    others = [n for n in order if n not in layer_rank]
    before = [n for n in others if position[n] < first_layer_pos]
    after = [n for n in others if position[n] >= first_layer_pos]
    return before + layer_names + after


def _restore_edge(stale: Graph, path: str, layout: Layout, graph: Graph, stage: int, layers: list[int],
                  new_nodes: dict[str, Node]) -> dict[str, Any]:
    """Plain CheckFree edge stage: every tensor of its layers from the earlier checkpoint, checked intact."""
    for l in layers:
        for suffix in layout.suffixes:
            name = layout.name(l, suffix)
            if name not in stale:
                raise SurgeonError(f"recover --edge-copy {path}: has no tensor {name} (the earlier copy of edge "
                                   f"stage {stage})")
            if name in graph and stale[name].shape != graph[name].shape:
                raise SurgeonError(f"recover --edge-copy {path}: {name} has shape {list(stale[name].shape)}, the "
                                   f"checkpoint {list(graph[name].shape)}")
            reason = _corruption(_raw_value(stale, name))
            if reason:
                raise SurgeonError(f"recover --edge-copy {path}: {name} is {reason} there too")
            new_nodes[name] = stale[name]
    return {"stage": stage, "layers": layers, "mode": "earlier copy (plain CheckFree edge)", "sources": [path],
            "coefficients": [1.0], "layer_sources": [{"layer": l, "from": [l]} for l in layers]}


def _describe(d: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(v)} {r}" for r, v in d.items())


def _recover_globals(graph: Graph, layout: Layout, params: Params, new_nodes: dict[str, Node],
                     warnings: list[str]) -> list[dict[str, Any]]:
    """Embeddings, head, final norm: replaced only from a replica (tied partner or ``replicas``), never guessed."""
    expected = {role: name for role, name in layout.globals_.items() if name}
    pairs = dict(params.replicas)
    for src_name in list(pairs) + list(pairs.values()):
        if src_name not in graph and src_name not in expected.values():
            raise SurgeonError(f"recover --replicas: no tensor named {src_name!r}")
    if layout.tied and "embed" in expected and "lm_head" in expected:
        pairs.setdefault(expected["embed"], expected["lm_head"])
        pairs.setdefault(expected["lm_head"], expected["embed"])
    done: list[dict[str, Any]] = []
    for role, name in expected.items():
        reason = "missing" if name not in graph else (_corruption(_raw_value(graph, name)) if params.scan else None)
        if reason is None:
            continue
        src = pairs.get(name)
        src_ok = src is not None and src in graph and _corruption(_raw_value(graph, src)) is None
        if not src_ok:
            raise SurgeonError(f"recover: {role} tensor {name} is {reason} and has no intact replica (a tied "
                               f"embedding/head, or --replicas {name}=<source>); refusing to invent it")
        if name in graph and graph[name].shape != graph[src].shape:
            raise SurgeonError(f"recover: replica {src} {list(graph[src].shape)} does not match {name} "
                               f"{list(graph[name].shape)}")
        new_nodes[name] = graph[src]
        done.append({"tensor": name, "role": role, "reason": reason, "from": src})
        warnings.append(f"{role} {name} was {reason}; taken from its replica {src}")
    return done
