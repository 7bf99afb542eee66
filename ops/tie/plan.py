"""The plan of a tie: which layer goes to which shared slot, which layers make each slot's shared weight, the
layer-relative tensor names and their LoRA ranks (Bae et al., arXiv 2410.20672, Sec. 3.1-3.2)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.ops.tie.op import Params
    from surgeon.ops.tie.relax import Relaxation

    from surgeon.arch import Roles
    from surgeon.graph import Graph

ROLE_NAMES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "attn.qkv", "mlp.gate_up")
GROUPS = ("attn", "mlp")


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


def check_module_key(key: str, what: str) -> None:
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


def make_plan(graph: Graph, params: Params, roles: Roles) -> Plan:
    """The plan for ``graph`` with its architecture ``roles`` (``ctx.roles(graph)``)."""
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


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_counts(graph: Graph, plan: Plan, relax: dict[tuple[int, str], Relaxation], params: Params,
                     members: list[list[int]]) -> dict[str, int]:
    """Parameter counts of the original, the pure recursive block, the LoRA factors and the compact form."""
    layer = {plan.layer(l, s) for l in range(plan.n_layers) for s in plan.suffixes}
    total = sum(_numel(graph[nm].shape) for nm in graph.names())
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
