"""ShiftAdd: each block linear becomes q binary sign matrices with power-of-two(-sum) scales (ShiftAddLLM,
You et al., NeurIPS 2024, arXiv 2406.05981; ALGORITHMS.md §7).

W ≈ Σ_{i=1..q} α_i ⊙ B_i, B_i ∈ {−1,+1}^{N×K}, α per (plane, row, group of ``group_size`` input columns), each α a
sum of ``pot_terms`` signed powers of two (APoT, arXiv 1909.13144), so x·W is table lookups, shifts and adds.

- activation-aware (the default; ``data`` = a text file or ``model:N``, self-sampled ``model:32`` when not given):
  the GPTQ column loop (arXiv 2210.17323) with the calibration Hessian H = XXᵀ/n, BCQ fit of α at each group start
  (``scale_layout`` ``lat``/``acc``: re-fitted inside the loop as in the authors' code), then per column the nearest
  codeword and the error fed forward through chol(H⁻¹) — the objective is the layer output error ‖(W − Ŵ)X‖.
- weight-only (``weight_only``): per-group BCQ with alternating rounds (arXiv 1802.00150); lazy, one tensor at a
  time.
- ``bits_budget``: per-layer bits (bits−1 or bits) from the sensitivity score ‖M‖_F·std(M)², M = W / diag(U).
- output: the packed format (``X.qweight`` bit-planes, ``X.pot_exp``/``X.pot_sign`` or ``X.scales``, ``X.perm``)
  (:mod:`surgeon.formats.shiftadd`, read by ``surgeon.load_shiftadd``), or a dense checkpoint with ``materialize``.

Modules: :mod:`.scales` (APoT rounding), :mod:`.bcq` (binary coding, weight-only fit), :mod:`.gptq` (activation-aware
fit, sensitivity, bit allocation), :mod:`.calibrate` (forward passes on the model), this module (the op).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from surgeon.ops.shiftadd.bcq import quantize_weight_only
from surgeon.ops.shiftadd.gptq import allocate_bits, sensitivity_score

from surgeon.edits import protected_tensors
from surgeon.errors import SurgeonError
from surgeon.formats.shiftadd import blob_layout, module_name, nbytes, quantization_config
from surgeon.registry import register

if TYPE_CHECKING:
    from surgeon.arch import Roles
    from surgeon.context import Context
    from surgeon.graph import Graph, Node


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: int = Field(3, ge=1, le=8, description="Binary planes per weight (q). With --bits-budget: the high "
                                                 "choice; layers get bits-1 or bits.")
    group_size: int = Field(128, ge=8, description="Input columns sharing one scale per row and plane "
                                                   "(a multiple of 8, so a LUT byte never spans two groups).")
    pot_terms: int = Field(3, ge=0, le=3, description="Power-of-two terms per scale: 1 = pure shift, 3 = "
                                                      "ShiftAddLLM's default; 0 = plain fp16 scales (BCQ).")
    rounds: int = Field(20, ge=0, le=1000, description="Alternating BCQ rounds (least-squares scales, then "
                                                       "nearest codewords) per group.")
    data: str = Field("model:32", description="Calibration text for the activation-aware fit (the paper's "
                                              "method): a text file, or `model`/`model:N` for N sequences "
                                              "sampled from the model itself.")
    weight_only: bool = Field(False, description="Skip calibration: per-group BCQ of the weights alone (no forward "
                                                 "passes, streams one linear at a time; far worse perplexity).")
    scale_layout: Literal["row", "lat", "acc"] = Field(
        "row", description="Where α lives and is refitted in the calibrated loop: `row` = per (row, group_size "
                           "columns) at each group start (packed LUT format); `lat` / `acc` = ShiftAddLLM's lat. "
                           "mode (per 8 columns × group_size/8 rows, refitted every 8 columns) / acc. mode (per "
                           "column × group_size rows, refitted every column; no QuIP) — dense output only.")
    seqlen: int = Field(256, ge=8, description="Calibration window length in tokens.")
    max_windows: int = Field(32, ge=1, description="Number of calibration windows.")
    damping: float = Field(0.01, gt=0, lt=1, description="Hessian damping: + damping·mean(diag H)·I.")
    block_size: int = Field(128, ge=8, description="GPTQ lazy-update block (columns; rounded up to whole groups).")
    act_order: bool = Field(True, description="Quantise 8-column blocks in order of decreasing Hessian diagonal "
                                              "(stores X.perm); calibrated fits only.")
    bits_budget: float | None = Field(None, description="Average bits per weight (numel-weighted) between "
                                                        "bits-1 and bits; layers are ranked by sensitivity.")
    layers: list[int] | None = Field(None, description="Decoder blocks whose linears are quantised (indices, "
                                     "e.g. [0, 1]); the others stay dense. Default: every block. A calibrated "
                                     "fit runs the model only up to the last of them.")
    materialize: bool = Field(False, description="Write dense Ŵ = Σα·B in the original dtype (loads anywhere) "
                                                 "instead of the packed format.")
    protect_edits: bool | None = Field(None, description="Keep the knowledge edits made earlier in the same run: "
                                       "the matrices an edit changed stay dense in their original dtype (the "
                                       "packed format has no place for a low-rank side term; SmolLM2's edited "
                                       "down-projection is 0.8 % of the block weights). Default: on when the run "
                                       "contains an edit step, off otherwise.")

    @field_validator("group_size")
    @classmethod
    def _whole_bytes(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"group_size {v}: expected a multiple of 8")
        return v

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0):
            raise ValueError(f"layers {v}: expected a non-empty list of block indices >= 0")
        return v

    @model_validator(mode="after")
    def _calibration_choice(self) -> Params:
        if self.weight_only and "data" in self.model_fields_set:
            raise ValueError("weight_only and data exclude each other: weight-only BCQ uses no calibration text")
        if self.scale_layout != "row" and (self.weight_only or not self.materialize):
            raise ValueError(f"scale_layout {self.scale_layout!r}: only for the calibrated fit with materialize "
                             "(the packed format stores α per (row, group); use scale_layout row)")
        return self

    @model_validator(mode="after")
    def _budget_in_range(self) -> Params:
        if self.bits_budget is not None:
            lo, hi = self.bits - 1, self.bits
            if lo < 1 or not lo <= self.bits_budget <= hi:
                raise ValueError(f"bits_budget {self.bits_budget}: expected a value in [{lo}, {hi}] "
                                 f"(layers get {lo} or {hi} bits with --bits {self.bits}; needs bits >= 2)")
        return self


def block_linear_names(graph: Graph, r: Roles) -> list[tuple[str, bool]]:
    """(weight name, transposed) of every block linear of ``graph`` given its roles (``ctx.roles(graph)``)."""
    out: list[tuple[str, bool]] = []
    for i in range(r.n_layers):
        role_of = {}
        for role in r.roles():
            if r.has(i, role):
                role_of.setdefault(r.tensor(i, role), role)
        for name in r.block_linears(i):
            node = graph[name]
            if len(node.shape) != 2 or not node.dtype.is_floating_point:
                continue
            out.append((name, r.transposed(role_of.get(name, ""))))
    if not out:
        raise SurgeonError("shiftadd: the model has no block linear layers to quantise")
    return out


def _in_layers(linears: list[tuple[str, bool]], r: Roles, layers: list[int] | None) -> list[tuple[str, bool]]:
    """The linears of the decoder blocks ``layers`` (all when None); refuses an index past the last block."""
    if layers is None:
        return linears
    bad = [i for i in layers if i >= r.n_layers]
    if bad:
        raise SurgeonError(f"shiftadd: layers: block {bad[0]} does not exist (the model has {r.n_layers} blocks)")
    keep = {n for i in layers for n in r.block_linears(i)}
    return [(n, tr) for n, tr in linears if n in keep]


def _lazy_packed_nodes(graph: Graph, name: str, transposed: bool, bits: int, params: Params, device: str
                       ) -> dict[str, Node]:
    """Nodes for one linear's packed tensors, all computed from one shared fit node (a uint8 blob).

    The writer evaluates every output with one executor, which memoises the blob while its consumers remain, so
    the fit runs once per linear and only one linear is in memory at a time.
    """
    from surgeon.graph import Apply

    src = graph[name]
    n, k = (src.shape[1], src.shape[0]) if transposed else src.shape
    layout = blob_layout(bits, n, k, params.group_size, params.pot_terms)
    total = sum(nbytes(s, d) for _, s, d in layout)

    def fit(w: torch.Tensor) -> torch.Tensor:
        w = w.T if transposed else w
        ql = quantize_weight_only(w, bits, params.group_size, rounds=params.rounds, pot_terms=params.pot_terms,
                                  device=device)
        tensors = ql.tensors("x")
        return torch.cat([tensors[f"x.{key}"].contiguous().view(torch.uint8).reshape(-1) for key, _, _ in layout])

    blob = Apply(fit, [src], label="shiftadd-fit", shape=(total,), dtype=torch.uint8)
    prefix = module_name(name)
    nodes: dict[str, Node] = {}
    offset = 0
    for key, shape, dtype in layout:
        size = nbytes(shape, dtype)

        def part(b: torch.Tensor, o: int = offset, s: int = size, sh: tuple = shape, dt: torch.dtype = dtype
                 ) -> torch.Tensor:
            return b[o:o + s].clone().view(dt).reshape(sh)

        nodes[f"{prefix}.{key}"] = Apply(part, [blob], label=f"shiftadd-{key}", shape=shape, dtype=dtype)
        offset += size
    return nodes


def _lazy_dense_node(graph: Graph, name: str, transposed: bool, bits: int, params: Params, device: str) -> Node:
    from surgeon.graph import Apply

    def fit(w: torch.Tensor) -> torch.Tensor:
        w2 = w.float().T if transposed else w.float()
        ql = quantize_weight_only(w2, bits, params.group_size, rounds=params.rounds, pot_terms=params.pot_terms,
                                  device=device)
        d = ql.dense()
        return d.T if transposed else d

    return Apply(fit, [graph[name]], label="shiftadd-dense")


@register("shiftadd", Params, summary="ShiftAdd: binary-coded weights with power-of-two scales + LUT kernel.")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """ShiftAdd reparameterisation of every block linear (activation-aware by default, or lazy weight-only)."""
    graph = graph.copy()
    roles = ctx.roles(graph)
    kept = protected_tensors(graph, params.protect_edits)
    linears = [(n, tr) for n, tr in _in_layers(block_linear_names(graph, roles), roles, params.layers)
               if n not in kept]
    if kept:
        ctx.report(protect_edits=True, kept_dense_for_edits=sorted(kept))
        ctx.log(f"shiftadd: {len(kept)} edited matri{'x' if len(kept) == 1 else 'ces'} kept dense (protect_edits)")
    if not linears:
        raise SurgeonError("shiftadd: every selected block linear carries an edit and protect_edits keeps them "
                           "all dense")
    transposed = dict(linears)
    in_features = {n: graph[n].shape[0 if tr else 1] for n, tr in linears}
    if not params.weight_only:
        from surgeon.ops.shiftadd.calibrate import fit_calibrated

        bits_of, new_nodes, extra = fit_calibrated(graph, params, ctx, roles, linears)
        for name, nodes in new_nodes.items():
            graph.splice(name, nodes)
        _finish(graph, params, ctx, bits_of, transposed, in_features,
                act_order=params.act_order and not params.materialize, extra=extra)
        return graph
    if params.bits_budget is not None:
        scores, numels = {}, {}
        for name, value in ctx.progress(graph.values([n for n, _ in linears]), total=len(linears),
                                        description="shiftadd: sensitivity"):
            w = value.float().T if transposed[name] else value.float()
            scores[name] = sensitivity_score(w)
            numels[name] = w.numel()
        bits_of = allocate_bits(scores, numels, params.bits_budget, params.bits - 1, params.bits)
    else:
        bits_of = {n: params.bits for n, _ in linears}
    for name, tr in linears:
        if params.materialize:
            graph.replace(name, _lazy_dense_node(graph, name, tr, bits_of[name], params, ctx.device))
        else:
            graph.splice(name, _lazy_packed_nodes(graph, name, tr, bits_of[name], params, ctx.device))
    _finish(graph, params, ctx, bits_of, transposed, in_features, act_order=False)
    return graph


def _finish(graph: Graph, params: Params, ctx: Context, bits_of: dict[str, int], transposed: dict[str, bool],
            in_features: dict[str, int], *, act_order: bool, extra: dict[str, Any] | None = None) -> None:
    if not params.materialize:
        graph.config["quantization_config"] = quantization_config(
            bits=params.bits if params.bits_budget is None else None, bits_budget=params.bits_budget,
            group_size=params.group_size, pot_terms=params.pot_terms, act_order=act_order,
            calibrated=not params.weight_only, bits_of=bits_of, transposed=transposed, in_features=in_features)
        graph.tags.append("shiftadd")
    numel = {}
    for name in bits_of:
        packed = f"{module_name(name)}.qweight"
        numel[name] = (graph[packed].shape[1] * in_features[name] if packed in graph
                       else math.prod(graph[name].shape))
    avg_bits = sum(bits_of[n] * numel[n] for n in bits_of) / max(1, sum(numel.values()))
    report: dict[str, Any] = {"linears": len(bits_of), "average_bits": round(avg_bits, 4),
                              "bits_per_layer": {module_name(n): b for n, b in bits_of.items()},
                              "group_size": params.group_size, "pot_terms": params.pot_terms,
                              "format": "dense (materialized)" if params.materialize else "packed"}
    if extra:
        report.update(extra)
    ctx.report(**report)
    if params.bits_budget is not None:
        counts = {b: sum(1 for v in bits_of.values() if v == b) for b in sorted(set(bits_of.values()))}
        ctx.log(f"shiftadd: bit allocation {counts} (average {avg_bits:.3f} bits/weight)")
