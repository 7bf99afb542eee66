"""Relaxed Recursive Transformers: tie L layers into K shared slots run N_loop times, then relax each unrolled
layer with a rank-r LoRA initialised from the truncated SVD of what tying removed.

Bae et al., "Relaxed Recursive Transformers", ICLR 2025, arXiv 2410.20672 (Sec. 3, App. F). We produce the
initialisation; the paper's quality needs uptraining afterwards.

Three output forms (one per run):
- compact (default): the shared block once (``model.shared_layers.{k}.…``), per-layer ``….lora_A.weight`` /
  ``….lora_B.weight``, ``config["recursion"]`` and ``recursion.json``; ``surgeon.load_recursive``
  (:mod:`surgeon.formats.recursive`) turns it into a transformers model whose tied layers share storage.
- ``materialize``: a vanilla L-layer checkpoint with W_ℓ = W′_slot(ℓ) + B_ℓA_ℓ.
- ``tied_base``: the vanilla L-layer checkpoint whose layers are copies of their shared slot (no LoRA): the base
  the ``lora/`` PEFT adapter applies to with plain transformers + peft.

LoRA initialisation: the paper's truncated SVD of the weight residual (``lora_init="svd"``), or the activation-aware
one (``"activation"``): the original model runs over calibration text on the model engine and each layer's
residual SVD is whitened by its input Gram matrix, so B A minimises the layer's output error instead (closed form,
exact at full rank; a deviation from the paper, docs/tie.md).

Modules: :mod:`.plan` (slot map, shared sources, ranks), :mod:`.relax` (SVD of the residuals), this module (the op).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from surgeon.ops.tie.plan import Plan, check_module_key, make_plan, module_rank, parameter_counts
from surgeon.ops.tie.relax import Relaxation, relax_residual, relax_residual_whitened

from surgeon.formats.recursive import RECURSION_KEY, peft_adapter_files
from surgeon.registry import register

if TYPE_CHECKING:
    import torch

    from surgeon.context import Context
    from surgeon.graph import Graph, Node


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loops: int = Field(2, ge=1, description="N_loop: how many times the shared block runs; it must divide the "
                                            "number of tied layers (no layer is silently dropped).")
    pattern: Literal["cycle", "sequence", "middle-cycle", "middle-sequence"] = Field(
        "cycle", description="Layer -> shared slot map. cycle: slot = l mod K (the paper's choice); sequence: "
                             "slot = l // loops; middle-*: first and last layers stay unique, the middle L-2 are "
                             "tied with cycle/sequence.")
    init: Literal["auto", "average", "stepwise", "lower"] = Field(
        "auto", description="Shared weights: average of the tied layers, stepwise (layers at round(linspace)), or "
                            "lower (the first K layers). auto = stepwise at rank 0, average when relaxed.")
    rank: int = Field(64, ge=0, description="LoRA rank per unrolled layer and linear (0 = pure recursive model). "
                                            "Capped at min(d_in, d_out): at that rank every relaxed linear is "
                                            "exact, but the model equals the original only with --untie-norms "
                                            "(tied norms are averaged, never relaxed).")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="Per-module ranks overriding --rank: keys are roles (attn.q, mlp.down), groups (attn, mlp) "
                    "or re:<regex> full-matched on the layer-relative tensor name; e.g. mlp=128,attn=32.")
    targets: list[str] = Field(
        default_factory=list, description="Linears to relax (roles or groups); empty = every linear of a block. "
                                          "Other linears are tied without LoRA.")
    untie_norms: bool = Field(False, description="Keep each layer's own norm weights and biases (1-D tensors) "
                                                 "instead of sharing them (the paper ties them).")
    materialize: bool = Field(False, description="Write a vanilla checkpoint with W = W_shared + B A per layer "
                                                 "instead of the compact shared form.")
    tied_base: bool = Field(False, description="Write the unrolled checkpoint whose layers are plain copies of "
                                               "their shared slot, plus the lora/ adapter that relaxes it.")
    lora_alpha_ratio: float = Field(
        1.0, gt=0, description="lora_alpha = ratio x r, so each layer computes W' + ratio * B A with the SVD factors "
                               "B = U_r S_r, A = V_r^T. 1 (default): the paper's init W' + BA ~ W, exact at full "
                               "rank. 2: the Mixture-of-Recursions code (alpha_pattern 2.0), whose step-0 model "
                               "adds the residual twice.")
    lora_init: Literal["activation", "svd"] = Field(
        "svd", description="LoRA initialisation. svd: the paper's truncated SVD of the weight residual (minimises "
                           "||R - BA||). activation: truncated SVD of the residual whitened by the calibration "
                           "inputs' Gram matrix (minimises each layer's output error ||(R - BA) X|| on the "
                           "calibration tokens; exact at full rank); runs the model over --calibration.")
    calibration: str = Field("model:32", description="Calibration text for lora_init=activation: a .txt/.jsonl "
                             "file, a datasets folder, or 'model:N' (N sequences sampled from the model).")
    calibration_windows: int = Field(32, ge=1, le=4096, description="Calibration windows (lora_init=activation).")
    calibration_seqlen: int = Field(128, ge=2, le=2048, description="Tokens per calibration window.")
    damp: float = Field(0.01, gt=0, le=1, description="Damping of the calibration Gram matrix, as a fraction of its "
                        "mean diagonal (lora_init=activation).")
    svd: Literal["auto", "exact", "randomized"] = Field(
        "auto", description="Truncated SVD: exact, randomized (Halko et al., oversampling 10, 4 power iterations) "
                            "or auto (randomized when the rank is well below the matrix size).")

    @field_validator("rank_pattern", mode="before")
    @classmethod
    def _parse_pattern(cls, v: Any) -> Any:
        if isinstance(v, str):  # CLI form "mlp=128,attn=32"
            out: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in v.split(","))):
                key, sep, val = part.partition("=")
                if not sep:
                    raise ValueError(f"rank_pattern: expected key=rank pairs separated by commas, got {part!r}")
                out[key.strip()] = val.strip()
            return out
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _check_pattern(cls, v: dict[str, int]) -> dict[str, int]:
        for key, rank in v.items():
            check_module_key(key, "rank_pattern")
            if rank < 0:
                raise ValueError(f"rank_pattern: rank for {key!r} must be >= 0, got {rank}")
        return v

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v: list[str]) -> list[str]:
        for key in v:
            check_module_key(key, "targets")
        return v

    @model_validator(mode="after")
    def _check_forms(self) -> Params:
        if self.materialize and self.tied_base:
            raise ValueError("materialize and tied_base are exclusive: pick one output form")
        return self

    def any_rank(self) -> bool:
        return self.rank > 0 or any(r > 0 for r in self.rank_pattern.values())

    def resolved_init(self) -> str:
        if self.init != "auto":
            return self.init
        return "average" if self.any_rank() else "stepwise"


def _mean_fn(*xs: torch.Tensor) -> torch.Tensor:
    acc = xs[0].float().clone()
    for x in xs[1:]:
        acc += x.float()
    return acc / len(xs)


@register("tie", Params, summary="Relaxed Recursive Transformer: tie layers, relax with SVD LoRA.")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Tie layers into a recursive block and relax each unrolled layer with an SVD-initialised LoRA."""
    plan = make_plan(graph, params, ctx.roles(graph))
    n_slots = max(plan.slots) + 1
    members = [[l for l, s in enumerate(plan.slots) if s == k] for k in range(n_slots)]
    shared = _shared_nodes(graph, plan)
    relax, stats = _relax_layers(graph, plan, params, ctx, shared, members)
    form = "materialized" if params.materialize else "tied-base" if params.tied_base else "compact"
    block = (_compact_block(graph, plan, params, shared, relax) if form == "compact"
             else _unrolled_block(graph, plan, params, shared, relax, form))
    layer_names = {plan.layer(l, s) for l in range(plan.n_layers) for s in plan.suffixes}
    order: list[str] = []
    emitted = False
    for name in graph.names():  # the new block takes the place of the first layer tensor
        if name not in layer_names:
            order.append(name)
        elif not emitted:
            order.extend(block)
            emitted = True
    out = graph.copy()
    out.reorder(order, new=block)
    _bookkeeping(out, graph, plan, params, ctx, relax, stats, members, form)
    return out


def _shared_nodes(graph: Graph, plan: Plan) -> dict[tuple[int, str], Node]:
    """Each slot's shared tensors, lazy: a source node (stepwise/lower) or the mean of its sources (average)."""
    from surgeon.graph import Apply

    shared: dict[tuple[int, str], Node] = {}
    for k, sources in enumerate(plan.sources):
        for suffix in plan.suffixes:
            srcs = [graph[plan.layer(l, suffix)] for l in sources]
            shared[(k, suffix)] = srcs[0] if len(srcs) == 1 else Apply(
                _mean_fn, srcs, label=f"tie.average[{','.join(map(str, sources))}]")
    return shared


def _relax_layers(graph: Graph, plan: Plan, params: Params, ctx: Context, shared: dict[tuple[int, str], Node],
                  members: list[list[int]]) -> tuple[dict[tuple[int, str], Relaxation], list[dict[str, Any]]]:
    """The LoRA factors of every relaxed (layer, linear), computed now (small), and their energy statistics."""
    relax: dict[tuple[int, str], Relaxation] = {}
    stats: list[dict[str, Any]] = []
    work = [(k, s) for k in range(len(members)) for s in plan.suffixes
            if s in plan.linears and len(members[k]) > 1 and module_rank(params, plan.linears[s][0], s) > 0]
    if params.lora_init == "activation" and work:
        _relax_by_activations(graph, plan, params, ctx, shared, {s for _, s in work}, relax, stats)
        return relax, stats
    for k, suffix in ctx.progress(work, total=len(work), description="tie: SVD of residuals"):
        w_shared = _shared_value(shared[(k, suffix)])
        for l in members[k]:
            _relax_one(graph, plan, params, ctx, l, suffix, w_shared, None, relax, stats)
    return relax, stats


def _shared_value(node: Node) -> torch.Tensor:
    return _value(node).to(node.dtype).float()  # residual against the stored (rounded) shared weight


def _relax_one(graph: Graph, plan: Plan, params: Params, ctx: Context, l: int, suffix: str, w_shared: torch.Tensor,
               gram: torch.Tensor | None, relax: dict[tuple[int, str], Relaxation], stats: list[dict[str, Any]]
               ) -> None:
    """Relax layer ``l``'s linear ``suffix``: plain SVD of its residual, or whitened by ``gram`` when given."""
    role, transposed = plan.linears[suffix]
    res = graph.value(plan.layer(l, suffix)).float() - w_shared
    if transposed:
        res = res.T
    entry = {"layer": l, "slot": plan.slots[l], "module": suffix, "rank": 0, "residual_norm": 0.0,
             "retained_energy": 1.0, "error": 0.0}
    if bool(res.any()):
        rank = module_rank(params, role, suffix)
        if gram is None:
            rx = relax_residual(res.contiguous(), rank, method=params.svd, device=ctx.device, seed=ctx.seed_for(0))
        else:
            rx = relax_residual_whitened(res, gram, rank, damp=params.damp, device=ctx.device)
        entry.update(rank=int(rx.up.shape[1]), residual_norm=rx.residual_norm, retained_energy=rx.retained_energy,
                     error=rx.error)
        if rx.up.shape[1] > 0:
            relax[(l, suffix)] = rx
    stats.append(entry)
    ctx.status(f"layer {l} {suffix}")


def _relax_by_activations(graph: Graph, plan: Plan, params: Params, ctx: Context,
                          shared: dict[tuple[int, str], Node], suffixes: set[str],
                          relax: dict[tuple[int, str], Relaxation], stats: list[dict[str, Any]]) -> None:
    """Activation-aware relaxation on the model engine: the *original* model runs over the calibration windows
    block by block; each block's input Gram matrices X Xᵀ whiten its residuals' SVDs, then are freed."""
    from surgeon import engine

    tokens = ctx.tokens(params.calibration, graph, seqlen=params.calibration_seqlen,
                        max_windows=params.calibration_windows)
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=4)
    ordered = [s for s in plan.suffixes if s in suffixes]
    trans = {plan.layer(l, s) for l in range(plan.n_layers) for s in ordered if plan.linears[s][1]}
    with ctx.timed("calibrate"):
        for block in eng.blocks(tokens, record=False, progress=ctx.progress):
            l = block.index
            if plan.slots.count(plan.slots[l]) == 1:
                continue  # an untied layer (middle-* ends) keeps its own weights
            grams = block.observe({plan.layer(l, s): ("xtx",) for s in ordered}, transposed=trans)
            for s in ordered:
                gram = grams.pop(plan.layer(l, s)).xtx
                _relax_one(graph, plan, params, ctx, l, s, _shared_value(shared[(plan.slots[l], s)]), gram,
                           relax, stats)
    ctx.report(calibration_windows=int(tokens.shape[0]), calibration_seqlen=int(tokens.shape[1]))


def _untied(graph: Graph, plan: Plan, params: Params, suffix: str) -> bool:
    return params.untie_norms and len(graph[plan.layer(0, suffix)].shape) == 1


def _compact_block(graph: Graph, plan: Plan, params: Params, shared: dict[tuple[int, str], Node],
                   relax: dict[tuple[int, str], Relaxation]) -> dict[str, Node]:
    """The compact form's block: shared slots, then per layer its untied tensors and LoRA factors."""
    from surgeon.graph import Const

    block: dict[str, Node] = {}
    for k in range(len(plan.sources)):
        for s in plan.suffixes:
            if not _untied(graph, plan, params, s):
                block[plan.shared(k, s)] = shared[(k, s)]
    for l in range(plan.n_layers):
        for s in plan.suffixes:
            if _untied(graph, plan, params, s):
                block[plan.layer(l, s)] = graph[plan.layer(l, s)]
            rx = relax.get((l, s))
            if rx is not None:
                dt = graph[plan.layer(l, s)].dtype
                stem = plan.layer(l, s).removesuffix(".weight")
                block[stem + ".lora_A.weight"] = Const(rx.down.to(dt), label="tie.lora_A")
                block[stem + ".lora_B.weight"] = Const(rx.up.to(dt), label="tie.lora_B")
    return block


def _unrolled_block(graph: Graph, plan: Plan, params: Params, shared: dict[tuple[int, str], Node],
                    relax: dict[tuple[int, str], Relaxation], form: str) -> dict[str, Node]:
    """Every layer spelled out: its slot's shared tensor, plus B A when ``materialized``."""
    from surgeon.graph import LowRank

    block: dict[str, Node] = {}
    for l in range(plan.n_layers):
        for s in plan.suffixes:
            k = plan.slots[l]
            rx = relax.get((l, s))
            if _untied(graph, plan, params, s):
                block[plan.layer(l, s)] = graph[plan.layer(l, s)]
            elif form == "materialized" and rx is not None:
                block[plan.layer(l, s)] = LowRank(shared[(k, s)], rx.up * params.lora_alpha_ratio, rx.down,
                                                  transposed=plan.linears[s][1], label="tie.relaxed")
            else:
                block[plan.layer(l, s)] = shared[(k, s)]
    return block


def _bookkeeping(out: Graph, graph: Graph, plan: Plan, params: Params, ctx: Context,
                 relax: dict[tuple[int, str], Relaxation], stats: list[dict[str, Any]], members: list[list[int]],
                 form: str) -> None:
    """Config, recursion.json, the PEFT adapter, the report and the card notes."""
    init = params.resolved_init()
    recursion = {
        "pattern": params.pattern, "loops": params.loops, "init": init, "n_layers": plan.n_layers,
        "n_slots": len(members), "layer_to_slot": plan.slots, "shared_sources": plan.sources,
        "layer_prefix": plan.layer_prefix, "shared_prefix": plan.shared_prefix,
        "untie_norms": params.untie_norms, "lora_alpha_ratio": params.lora_alpha_ratio,
        "lora_init": params.lora_init if relax else None,
        "ranks": {f"{l}:{s}": int(rx.up.shape[1]) for (l, s), rx in sorted(relax.items())},
    }
    counts = parameter_counts(graph, plan, relax, params, members)
    if form == "compact":
        out.config[RECURSION_KEY] = recursion
    summary = {"form": form, **recursion, "parameters": counts, "modules": stats, "source": graph.base_model}
    ctx.attach(out, "recursion.json", json.dumps(summary, indent=2) + "\n")
    if relax and form != "materialized":
        for name, data in _adapter_files(graph, plan, relax, params).items():
            ctx.attach(out, name, data)
    mean_energy = (sum(e["retained_energy"] for e in stats) / len(stats)) if stats else 1.0
    ctx.report(tie={"form": form, "pattern": params.pattern, "loops": params.loops, "init": init,
                    "lora_init": params.lora_init, "rank": params.rank, "rank_pattern": params.rank_pattern,
                    "slots": len(members),
                    "parameters": counts, "mean_retained_energy": round(mean_energy, 6),
                    "max_error": max((e["error"] for e in stats), default=0.0)},
               card_notes=[_card_note(form, bool(relax)), UPTRAIN_NOTE])
    out.tags.append("recursive-transformer")


def _adapter_files(graph: Graph, plan: Plan, relax: dict[tuple[int, str], Relaxation], params: Params
                   ) -> dict[str, str | bytes]:
    """The ``lora/`` PEFT adapter for the unrolled tied model: one factor pair per relaxed module."""
    factors = {}
    fan_in_fan_out = False
    for (l, s), rx in sorted(relax.items()):
        dt = graph[plan.layer(l, s)].dtype
        factors[plan.layer(l, s).removesuffix(".weight")] = (rx.down.to(dt), rx.up.to(dt))
        fan_in_fan_out |= plan.linears[s][1]
    return peft_adapter_files(factors, base=graph.base_model, alpha_ratio=params.lora_alpha_ratio,
                              fan_in_fan_out=fan_in_fan_out)


UPTRAIN_NOTE = ("Layer tying (Relaxed Recursive Transformers, Bae et al., arXiv 2410.20672) produces an "
                "initialisation: the paper uptrains on 15-60 B tokens before the recursive model recovers quality.")


def _card_note(form: str, relaxed: bool) -> str:
    adapter = " `lora/` holds the PEFT adapter for the tied base (`--tied-base`)." if relaxed else ""
    if form == "compact":
        return ("Compact recursive checkpoint (shared block + per-layer LoRA, loop in config `recursion`): load it "
                "with `import surgeon` then `AutoModelForCausalLM.from_pretrained(path)` (or `surgeon.load_recursive(path)`); "
                "without surgeon, transformers refuses its model type `surgeon_recursive`." + adapter)
    if form == "tied-base":
        return ("Unrolled tied base: every layer is a copy of its shared slot." + adapter +
                " Apply it with `PeftModel.from_pretrained(model, path + '/lora')`.")
    return "Materialised relaxed model: W_l = W_shared + B_l A_l per layer, a vanilla checkpoint."


def _value(node: Node) -> torch.Tensor:
    from surgeon.graph import Executor

    return Executor([node]).evaluate_all()[0]
