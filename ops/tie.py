"""Relaxed Recursive Transformers: tie L layers into K shared slots run N_loop times, then relax each unrolled
layer with a rank-r LoRA initialised from the truncated SVD of what tying removed.

Bae et al., "Relaxed Recursive Transformers", ICLR 2025, arXiv 2410.20672 (Sec. 3, App. F). We produce the
initialisation; the paper's quality needs uptraining afterwards.

Three output forms (one per run):
- compact (default): the shared block once (``model.shared_layers.{k}.…``), per-layer ``….lora_A.weight`` /
  ``….lora_B.weight``, ``config["recursion"]`` and ``recursion.json``; :func:`load_recursive` turns it into a
  transformers model whose tied layers share storage.
- ``materialize``: a vanilla L-layer checkpoint with W_ℓ = W′_slot(ℓ) + B_ℓA_ℓ.
- ``tied_base``: the vanilla L-layer checkpoint whose layers are copies of their shared slot (no LoRA): the base
  the ``lora/`` PEFT adapter applies to with plain transformers + peft.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surgeon.errors import SurgeonError
from surgeon.registry import register

if TYPE_CHECKING:
    import torch

    from surgeon.context import Context
    from surgeon.graph import Graph, Node

ROLE_NAMES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "attn.qkv", "mlp.gate_up")
GROUPS = ("attn", "mlp")
ADAPTER_DIR = "lora"


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
            _check_module_key(key, "rank_pattern")
            if rank < 0:
                raise ValueError(f"rank_pattern: rank for {key!r} must be >= 0, got {rank}")
        return v

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v: list[str]) -> list[str]:
        for key in v:
            _check_module_key(key, "targets")
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


def _check_module_key(key: str, what: str) -> None:
    if key in ROLE_NAMES or key in GROUPS:
        return
    if key.startswith("re:"):
        try:
            re.compile(key[3:])
        except re.error as e:
            raise ValueError(f"{what}: bad regular expression {key!r}: {e}") from None
        return
    raise ValueError(f"{what}: unknown module key {key!r} (expected one of {', '.join(ROLE_NAMES + GROUPS)} "
                     f"or re:<regex>)")


def _key_matches(key: str, role: str | None, suffix: str) -> bool:
    if key.startswith("re:"):
        return re.fullmatch(key[3:], suffix) is not None
    if role is not None:
        return key == role or key == role.split(".")[0]
    return key in GROUPS and key in suffix  # a linear without a known role: group by its name


# pure math ------------------------------------------------------------------------------------------------------
def slot_map(n_layers: int, loops: int, pattern: str) -> list[int]:
    """Shared slot of each of the ``n_layers`` layers (0-based). Paper Sec. 3.1, Fig. 2.

    cycle: slot(l) = l mod K; sequence: slot(l) = l // loops, with K = L / loops. ``middle-*`` keep layer 0 in
    slot 0 and layer L-1 in slot K+1, tying the middle L-2 layers as cycle/sequence into slots 1..K.
    """
    middle = pattern.startswith("middle-")
    tied = n_layers - 2 if middle else n_layers
    if tied <= 0 or tied % loops:
        what = f"the {tied} middle layers (L-2)" if middle else f"the {n_layers} layers"
        raise SurgeonError(f"tie --loops {loops}: does not divide {what}; choose loops dividing {tied} "
                           f"(layers are never dropped silently)")
    k = tied // loops
    base = pattern.removeprefix("middle-")
    inner = [(i % k) if base == "cycle" else (i // loops) for i in range(tied)]
    if middle:
        return [0] + [s + 1 for s in inner] + [k + 1]
    return inner


def shared_sources(slots: Sequence[int], init: str) -> list[list[int]]:
    """For each slot, the layers whose mean is its shared weight (one layer for stepwise/lower).

    Unique slots (one member) keep their own layer. For tied slots over the region [a, b) of ``K`` slots:
    average = mean of the members; stepwise = the j-th point of linspace(a, b-1, K) rounded half to even (Python's
    ``round``, as the Mixture-of-Recursions reference code does; it keeps the region's first and last layer, paper
    Sec. 3.2); lower = layer a + j.
    """
    n_slots = max(slots) + 1
    members = [[l for l, s in enumerate(slots) if s == k] for k in range(n_slots)]
    tied = [k for k in range(n_slots) if len(members[k]) > 1]
    if not tied:
        return members
    region = sorted(l for k in tied for l in members[k])
    a, b = region[0], region[-1] + 1
    out: list[list[int]] = []
    for k in range(n_slots):
        if len(members[k]) == 1 or init == "average":
            out.append(members[k])
            continue
        j, kk = tied.index(k), len(tied)
        if init == "stepwise":
            src = stepwise_layer(a, b - 1, kk, j)
        else:  # lower
            src = a + j
        out.append([src])
    return out


def stepwise_layer(first: int, last: int, count: int, j: int) -> int:
    """The j-th of ``count`` layers spread evenly over [first, last]: ``round(linspace(first, last, count)[j])``.

    numpy's linspace computes ``first + j·step`` with ``step = (last − first)/(count − 1)`` and pins the last point
    to ``last``; ``round`` is Python's (half to even), as in the reference code. Half-up rounding picks another layer
    for one slot at L = 18, 22, 26 (e.g. 8.5 → 8, not 9, for L = 18, K = 9).
    """
    if count <= 1:
        return first
    if j == count - 1:
        return last
    return round(first + j * ((last - first) / (count - 1)))


@dataclass
class Relaxation:
    """``R ≈ B A`` with ``B = U_r Σ_r`` [out, r], ``A = V_rᵀ`` [r, in] and the energy bookkeeping of Sec. 3.3."""

    up: torch.Tensor
    down: torch.Tensor
    residual_norm: float
    retained_energy: float  # Σ_{i≤r} σ_i² / Σ σ_i²
    error: float  # ‖R − BA‖_F = √Σ_{i>r} σ_i²


def relax_residual(residual: torch.Tensor, rank: int, *, method: str = "auto", device: str = "cpu",
                   seed: int = 0) -> Relaxation:
    """Truncated SVD of the tying residual R = W_ℓ − W′ (fp32). ``rank`` is capped at min(out, in).

    The error is ‖R − BA‖_F: the dropped singular energy √Σ_{i>r}σ_i² for the exact SVD (Eckart–Young), measured
    directly for the randomized one.
    """
    from surgeon.kernels.linalg import randomized_svd, svd

    with _lapack_threads(1 if device == "cpu" else None):
        return _relax(residual, rank, method, device, seed, randomized_svd, svd)


@contextlib.contextmanager
def _lapack_threads(n: int | None) -> Iterator[None]:
    """Run LAPACK single-threaded on CPU: MKL's threaded gesdd on matrices of a few hundred rows is slower than one
    thread on a busy machine (measured 0.43 s vs 1.07 s for 1536×576 with 2 threads under load, 0.003 s vs
    0.58 s for 128×64), and residual SVDs are many small independent problems."""
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _relax(residual, rank, method, device, seed, randomized_svd, svd) -> Relaxation:
    r = max(0, min(rank, *residual.shape))
    import torch

    total = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2
    if method == "randomized" or (method == "auto" and 3 * (r + 10) < min(residual.shape)):
        u, s, vh = randomized_svd(residual, r, device=device, seed=seed)
        up = u * s
        dropped = total - float(s.double().pow(2).sum())
        if dropped > 1e-4 * total:  # U_r orthonormal and Σ_rV_rᵀ = U_rᵀR: ‖R − BA‖² = ‖R‖² − Σσ_r²
            error = max(dropped, 0.0) ** 0.5
        else:  # ... which cancels in fp32 when little is dropped: measure the remainder instead
            error = float(torch.linalg.vector_norm(residual.to(up.device) - up @ vh, dtype=torch.float64))
    else:
        u, s_all, vh = svd(residual, device=device)
        s, u, vh = s_all[:r], u[:, :r], vh[:r]
        up = u * s
        error = float(s_all[r:].double().pow(2).sum().sqrt())
    kept = float(s.double().pow(2).sum())
    return Relaxation(up=up, down=vh, residual_norm=total ** 0.5,
                      retained_energy=min(kept / total, 1.0) if total > 0 else 1.0, error=error)


# plan --------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything ``apply`` decides before computing: prefixes, the slot map, and which tensors are tied."""

    n_layers: int
    slots: list[int]
    sources: list[list[int]]
    layer_prefix: str  # template with {i}
    shared_prefix: str  # template with {k}
    suffixes: list[str]  # layer-relative tensor names, shared by every layer
    linears: dict[str, tuple[str | None, bool]] = field(default_factory=dict)  # suffix -> (role, transposed)

    def layer(self, i: int, suffix: str) -> str:
        return self.layer_prefix.format(i=i) + suffix

    def shared(self, k: int, suffix: str) -> str:
        return self.shared_prefix.format(k=k) + suffix


def _layer_template(prefix0: str, prefix1: str) -> str:
    """``model.layers.0.`` and ``model.layers.1.`` -> ``model.layers.{i}.``"""
    if not prefix0.endswith("0.") or prefix0[:-2] != prefix1[:-2]:
        raise SurgeonError(f"tie: cannot read the layer numbering from prefixes {prefix0!r}, {prefix1!r}")
    return prefix0[:-2] + "{i}."


def _shared_template(layer_template: str) -> str:
    """``model.layers.{i}.`` -> ``model.shared_layers.{k}.`` (``h.{i}.`` -> ``shared_h.{k}.``)."""
    stem = layer_template[: -len("{i}.")].rstrip(".")
    parent, _, leaf = stem.rpartition(".")
    return (parent + "." if parent else "") + "shared_" + leaf + ".{k}."


def make_plan(graph: Graph, params: Params) -> Plan:
    from surgeon.arch import roles_for

    roles = roles_for(graph.config, graph.names())
    n = roles.n_layers
    if n < 2:
        raise SurgeonError(f"tie: the model has {n} layer(s); tying needs at least 2")
    template = _layer_template(roles.layer_prefix(0), roles.layer_prefix(1))
    slots = slot_map(n, params.loops, params.pattern)
    sources = shared_sources(slots, params.resolved_init())
    names = graph.names()
    per_layer: list[list[str]] = []
    for i in range(n):
        p = template.format(i=i)
        per_layer.append([nm[len(p):] for nm in names if nm.startswith(p)])
    suffixes = per_layer[0]
    for i in range(1, n):
        if sorted(per_layer[i]) != sorted(suffixes):
            diff = sorted(set(per_layer[i]) ^ set(suffixes))
            raise SurgeonError(f"tie: layer {i} has different tensors from layer 0 ({', '.join(diff[:4])}); "
                               f"only identical blocks can be tied")
        for s in suffixes:
            if graph[template.format(i=i) + s].shape != graph[template.format(i=0) + s].shape:
                raise SurgeonError(f"tie: {template.format(i=i) + s} has shape {list(graph[template.format(i=i) + s].shape)}"
                                   f", layer 0 has {list(graph[template.format(i=0) + s].shape)}")
    role_of: dict[str, str] = {}
    for role in roles.roles():
        if role.startswith("norm.") or roles.rows(0, role) is not None or not roles.has(0, role):
            continue  # norms are not linears; a fused part (phi3 q inside qkv) is relaxed as its whole tensor
        role_of[roles.tensor(0, role)[len(template.format(i=0)):]] = role
    plan = Plan(n, slots, sources, template, _shared_template(template), suffixes)
    for name in roles.block_linears(0):
        suffix = name[len(template.format(i=0)):]
        role = role_of.get(suffix)
        transposed = bool(roles.transposed(role)) if role is not None else False
        plan.linears[suffix] = (role, transposed)
    return plan


def module_rank(params: Params, role: str | None, suffix: str) -> int:
    """The LoRA rank of one linear: exact role key > group key > regex key > ``rank``; 0 if not targeted."""
    if params.targets and not any(_key_matches(t, role, suffix) for t in params.targets):
        return 0
    best: tuple[int, int] | None = None
    for key, r in params.rank_pattern.items():
        if not _key_matches(key, role, suffix):
            continue
        prio = 0 if key == role else 1 if key in GROUPS else 2
        if best is None or prio < best[0]:
            best = (prio, r)
    return params.rank if best is None else best[1]


# op ---------------------------------------------------------------------------------------------------------
def _mean_fn(*xs: torch.Tensor) -> torch.Tensor:
    acc = xs[0].float().clone()
    for x in xs[1:]:
        acc += x.float()
    return acc / len(xs)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@register("tie", Params)
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Tie layers into a recursive block and relax each unrolled layer with an SVD-initialised LoRA."""

    from surgeon.graph import Apply, Const, LowRank

    plan = make_plan(graph, params)
    init = params.resolved_init()
    n_slots = max(plan.slots) + 1
    members = [[l for l, s in enumerate(plan.slots) if s == k] for k in range(n_slots)]

    # shared nodes: lazy (a source node for stepwise/lower, a mean for average)
    shared: dict[tuple[int, str], Node] = {}
    for k in range(n_slots):
        for suffix in plan.suffixes:
            srcs = [graph[plan.layer(l, suffix)] for l in plan.sources[k]]
            shared[(k, suffix)] = srcs[0] if len(srcs) == 1 else Apply(
                _mean_fn, srcs, label=f"tie.average[{','.join(map(str, plan.sources[k]))}]")

    def untied(suffix: str) -> bool:
        return params.untie_norms and len(graph[plan.layer(0, suffix)].shape) == 1

    # relaxations: computed now (the factors are small Consts; the energies go into recursion.json)
    relax: dict[tuple[int, str], Relaxation] = {}
    stats: list[dict[str, Any]] = []
    work = [(k, s) for k in range(n_slots) for s in plan.suffixes
            if s in plan.linears and len(members[k]) > 1 and module_rank(params, plan.linears[s][0], s) > 0]
    for k, suffix in ctx.progress(work, total=len(work), description="tie: SVD of residuals"):
        role, transposed = plan.linears[suffix]
        rank = module_rank(params, role, suffix)
        node = shared[(k, suffix)]
        w_shared = _value(node).to(node.dtype).float()  # residual against the stored (rounded) shared weight
        for l in members[k]:
            w = graph.value(plan.layer(l, suffix)).float()
            res = w - w_shared
            if transposed:
                res = res.T
            entry = {"layer": l, "slot": k, "module": suffix, "rank": 0, "residual_norm": 0.0,
                     "retained_energy": 1.0, "error": 0.0}
            if bool(res.any()):
                rx = relax_residual(res.contiguous(), rank, method=params.svd, device=ctx.device, seed=ctx.seed)
                entry.update(rank=int(rx.up.shape[1]), residual_norm=rx.residual_norm,
                             retained_energy=rx.retained_energy, error=rx.error)
                if rx.up.shape[1] > 0:
                    relax[(l, suffix)] = rx
            stats.append(entry)
            ctx.status(f"layer {l} {suffix}")

    # assemble the output graph in the source order
    out = graph.copy()
    new: dict[str, Node] = {}
    form = "materialized" if params.materialize else "tied-base" if params.tied_base else "compact"
    layer_names = {plan.layer(l, s) for l in range(plan.n_layers) for s in plan.suffixes}
    emitted = False
    for name, node in graph.nodes.items():
        if name not in layer_names:
            new[name] = node
            continue
        if emitted:
            continue
        emitted = True
        if form == "compact":
            for k in range(n_slots):
                for s in plan.suffixes:
                    if not untied(s):
                        new[plan.shared(k, s)] = shared[(k, s)]
            for l in range(plan.n_layers):
                for s in plan.suffixes:
                    if untied(s):
                        new[plan.layer(l, s)] = graph[plan.layer(l, s)]
                    rx = relax.get((l, s))
                    if rx is not None:
                        dt = graph[plan.layer(l, s)].dtype
                        stem = plan.layer(l, s).removesuffix(".weight")
                        new[stem + ".lora_A.weight"] = Const(rx.down.to(dt), label="tie.lora_A")
                        new[stem + ".lora_B.weight"] = Const(rx.up.to(dt), label="tie.lora_B")
        else:
            for l in range(plan.n_layers):
                for s in plan.suffixes:
                    k = plan.slots[l]
                    rx = relax.get((l, s))
                    if untied(s):
                        new[plan.layer(l, s)] = graph[plan.layer(l, s)]
                    elif form == "materialized" and rx is not None:
                        new[plan.layer(l, s)] = LowRank(shared[(k, s)], rx.up * params.lora_alpha_ratio, rx.down,
                                                        transposed=plan.linears[s][1], label="tie.relaxed")
                    else:
                        new[plan.layer(l, s)] = shared[(k, s)]
    out.nodes = new

    # bookkeeping: config, recursion.json, adapter, parameter counts
    recursion = {
        "pattern": params.pattern, "loops": params.loops, "init": init, "n_layers": plan.n_layers,
        "n_slots": n_slots, "layer_to_slot": plan.slots, "shared_sources": plan.sources,
        "layer_prefix": plan.layer_prefix, "shared_prefix": plan.shared_prefix,
        "untie_norms": params.untie_norms, "lora_alpha_ratio": params.lora_alpha_ratio,
        "ranks": {f"{l}:{s}": int(rx.up.shape[1]) for (l, s), rx in sorted(relax.items())},
    }
    counts = parameter_counts(graph, plan, relax, params, members)
    if form == "compact":
        out.config["recursion"] = recursion
    summary = {"form": form, **recursion, "parameters": counts, "modules": stats,
               "source": graph.base_model}
    out.extra_files["recursion.json"] = json.dumps(summary, indent=2) + "\n"
    if relax and form != "materialized":
        out.extra_files.update(peft_adapter_files(relax, plan, graph, base=graph.base_model,
                                                  alpha_ratio=params.lora_alpha_ratio))
    mean_energy = (sum(e["retained_energy"] for e in stats) / len(stats)) if stats else 1.0
    ctx.report(tie={"form": form, "pattern": params.pattern, "loops": params.loops, "init": init,
                    "rank": params.rank, "rank_pattern": params.rank_pattern, "slots": n_slots,
                    "parameters": counts, "mean_retained_energy": round(mean_energy, 6),
                    "max_error": max((e["error"] for e in stats), default=0.0)},
               card_notes=[_card_note(form, bool(relax)), UPTRAIN_NOTE])
    out.tags.append("recursive-transformer")
    return out


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


def parameter_counts(graph: Graph, plan: Plan, relax: dict[tuple[int, str], Relaxation], params: Params,
                     members: list[list[int]]) -> dict[str, int]:
    """Parameter counts of the original, the pure recursive block, the LoRA factors and the compact form."""
    layer = {plan.layer(l, s) for l in range(plan.n_layers) for s in plan.suffixes}
    total = sum(_numel(n.shape) for n in graph.nodes.values())
    outside = sum(_numel(graph[nm].shape) for nm in graph.names() if nm not in layer)
    block = sum(_numel(graph[plan.layer(0, s)].shape) for s in plan.suffixes)
    vec = sum(_numel(graph[plan.layer(0, s)].shape) for s in plan.suffixes
              if params.untie_norms and len(graph[plan.layer(0, s)].shape) == 1)
    n_slots = len(members)
    recursive = outside + n_slots * (block - vec) + plan.n_layers * vec
    lora = sum(rx.up.numel() + rx.down.numel() for rx in relax.values())
    return {"original": total, "original_layers": total - outside, "recursive": recursive,
            "recursive_layers": recursive - outside, "lora": lora, "compact": recursive + lora,
            "materialized": total}


def peft_adapter_files(relax: dict[tuple[int, str], Relaxation], plan: Plan, graph: Graph,
                       base: str | None, alpha_ratio: float = 1.0) -> dict[str, str | bytes]:
    """``lora/adapter_model.safetensors`` + ``lora/adapter_config.json`` for the unrolled tied model.

    lora_alpha = alpha_ratio · r per module (scale ``alpha_ratio``), other ranks in ``rank_pattern`` with
    ``alpha_pattern`` = alpha_ratio · their rank;
    targets are the exact module names that carry a factor (zero residuals and unique layers get none).
    """
    from safetensors.torch import save

    from surgeon.lora import adapter_config, adapter_tensors

    factors = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for (l, s), rx in sorted(relax.items()):
        module = plan.layer(l, s).removesuffix(".weight")
        dt = graph[plan.layer(l, s)].dtype
        factors[module] = (rx.down.to(dt), rx.up.to(dt))
        ranks[module] = int(rx.up.shape[1])
        fan_in_fan_out |= plan.linears[s][1]
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(counts, key=lambda r: (counts[r], r))
    # PEFT full-matches pattern keys as "(.*\.)?key": an escaped full module name hits that module only
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r0}
    config = adapter_config(base_model=base, target_modules=sorted(ranks), r=r0, alpha=alpha_ratio * r0,
                            rank_pattern=pattern, alpha_pattern={m: alpha_ratio * r for m, r in pattern.items()},
                            fan_in_fan_out=fan_in_fan_out)
    return {f"{ADAPTER_DIR}/adapter_model.safetensors": save(adapter_tensors(factors), metadata={"format": "pt"}),
            f"{ADAPTER_DIR}/adapter_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}


# loader -----------------------------------------------------------------------------------------------------
def load_recursive(path: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu"):
    """Load a compact recursive checkpoint written by ``surgeon tie`` as a transformers causal LM.

    Every unrolled layer's tied weight is the *same* ``nn.Parameter`` as its slot's (one storage, shared
    ``data_ptr``); relaxed linears are wrapped in :class:`RecursiveLoRALinear` that adds ``s·B(Ax)`` with
    s = ``recursion["lora_alpha_ratio"]`` (1 when absent).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgeon.checkpoint import open_checkpoint

    ck = open_checkpoint(path)
    rec = ck.config.get("recursion")
    if not isinstance(rec, dict):
        raise SurgeonError(f"{path}: config.json has no 'recursion' entry; not a compact checkpoint from "
                           f"`surgeon tie` (materialized outputs load with AutoModelForCausalLM)")
    cfg = AutoConfig.for_model(**ck.config)  # the base architecture's config (surgeon.formats.from_disk)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        torch_dtype = next((getattr(torch, t.dtype) for t in ck.tensors.values()), torch.float32)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    layer_t, shared_t = rec["layer_prefix"], rec["shared_prefix"]
    slots: list[int] = rec["layer_to_slot"]
    scale = float(rec.get("lora_alpha_ratio", 1.0))
    shared_params: dict[str, torch.nn.Parameter] = {}
    loaded: set[str] = set()

    def tensor(name: str) -> torch.Tensor:
        loaded.add(name)
        return ck.load(name).to(torch_dtype)

    for pname, param in list(model.named_parameters(remove_duplicate=True)):
        if pname in ck.tensors:  # embeddings, final norm, head, untied per-layer vectors
            param.data = tensor(pname)
    for l, k in enumerate(slots):
        lp, sp = layer_t.format(i=l), shared_t.format(k=k)
        block = model.get_submodule(lp.rstrip("."))
        for pname, _ in list(block.named_parameters()):
            own, common = lp + pname, sp + pname
            if own in ck.tensors:
                continue
            if common not in ck.tensors:
                raise SurgeonError(f"{path}: neither {own!r} nor the shared {common!r} is in the checkpoint")
            if common not in shared_params:
                shared_params[common] = torch.nn.Parameter(tensor(common), requires_grad=False)
            owner, _, attr = pname.rpartition(".")
            setattr(block.get_submodule(owner) if owner else block, attr, shared_params[common])
        for mname, module in list(block.named_modules()):
            a_name = f"{lp}{mname}.lora_A.weight"
            if not mname or a_name not in ck.tensors:
                continue
            wrapped = _recursive_lora_class()(module, tensor(a_name), tensor(f"{lp}{mname}.lora_B.weight"), scale)
            owner, _, attr = mname.rpartition(".")
            setattr(block.get_submodule(owner) if owner else block, attr, wrapped)
    missing = set(ck.tensors) - loaded
    if missing:
        raise SurgeonError(f"{path}: tensors not used by the recursive model: {', '.join(sorted(missing)[:4])}")
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()


@functools.cache
def _recursive_lora_class():
    import torch

    class RecursiveLoRALinear(torch.nn.Module):
        """A shared linear (``base``, whose weight is the slot's parameter) plus this layer's ``scale·B(Ax)``."""

        def __init__(self, base: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0):
            super().__init__()
            self.base = base
            self.scale = scale
            self.lora_A = torch.nn.Parameter(lora_a, requires_grad=False)  # [r, in]
            self.lora_B = torch.nn.Parameter(lora_b, requires_grad=False)  # [out, r]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lora = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A), self.lora_B)
            return self.base(x) + (lora if self.scale == 1.0 else self.scale * lora)

    return RecursiveLoRALinear


def __getattr__(name: str):  # keep torch out of import time (surgeon --help stays fast)
    if name == "RecursiveLoRALinear":
        cls = _recursive_lora_class()
        globals()["RecursiveLoRALinear"] = cls
        return cls
    raise AttributeError(name)
