"""The calibrated (activation-aware) ShiftAdd path on the model engine (:mod:`surgeon.engine`): block by block, each
decoder block's linears get their Hessian H = XXᵀ/n from the calibration inputs (``block.observe``), are fitted by
:func:`quantize_gptq`, the fitted Ŵ replaces W in the block, and the quantised block's outputs feed the next block
(ShiftAddLLM, arXiv 2406.05981; ALGORITHMS.md §7.2). Fitted tensors go to the engine's spill store and come back as
lazy nodes, so memory is one block, its Hessians and the calibration hidden states, whatever the depth."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from surgeon.ops.shiftadd.gptq import allocate_bits, output_error, quantize_gptq, sensitivity_score

from surgeon import engine
from surgeon.errors import SurgeonError
from surgeon.formats.shiftadd import module_name

if TYPE_CHECKING:
    from surgeon.ops.shiftadd.op import Params

    from surgeon.arch import Roles
    from surgeon.context import Context
    from surgeon.engine import Block, Engine, InputStats
    from surgeon.graph import Graph, Node

CALIBRATION_BATCH = 8


def _by_layer(roles: Roles, linears: list[tuple[str, bool]]) -> dict[int, list[str]]:
    """Block index -> the block linears (of ``linears``) it holds."""
    wanted = {n for n, _ in linears}
    out: dict[int, list[str]] = {}
    for i in range(roles.n_layers):
        names = [n for n in roles.block_linears(i) if n in wanted]
        if names:
            out[i] = names
    return out


def _hessians(block: Block, names: list[str], transposed: dict[str, bool]) -> dict[str, torch.Tensor]:
    """H = XXᵀ/n of each linear's input over every calibration token (one pass over the block; accumulated in
    fp32 as GPTQ does: a 14336-wide MLP-down Hessian is 0.8 GB)."""
    stats: dict[str, InputStats] = block.observe({n: ("xtx",) for n in names}, acc_dtype=torch.float32,
                                                 transposed={n for n in names if transposed[n]})
    out = {}
    for n in names:
        st = stats[n]
        if st.count == 0:
            raise SurgeonError(f"shiftadd: linear {n} saw no calibration input")
        out[n] = st.xtx.div_(st.count)
        st.xtx = None
    return out


def _weight(block: Block, name: str, transposed: bool) -> torch.Tensor:
    w = block.param(name).detach().float()
    return w.T if transposed else w


def _sensitivity_bits(eng: Engine, tokens: torch.Tensor, by_layer: dict[int, list[str]], params: Params,
                      transposed: dict[str, bool], ctx: Context) -> dict[str, int]:
    """Bits per linear under ``bits_budget`` from the calibrated sensitivity scores (one sweep, no change)."""
    scores, numels = {}, {}
    for block in eng.blocks(tokens, layers=sorted(by_layer), record=False, progress=ctx.progress):
        hs = _hessians(block, by_layer[block.index], transposed)
        for name, h in hs.items():
            w = _weight(block, name, transposed[name])
            scores[name] = sensitivity_score(w, h, params.damping)
            numels[name] = w.numel()
    return allocate_bits(scores, numels, params.bits_budget, params.bits - 1, params.bits)


def fit_calibrated(graph: Graph, params: Params, ctx: Context, roles: Roles, linears: list[tuple[str, bool]]
                   ) -> tuple[dict[str, int], dict[str, dict[str, Node]], dict[str, Any]]:
    """The activation-aware fit of ``linears`` (block linears, possibly of some blocks only): (bits per weight,
    new lazy nodes per weight, report extras). The engine runs only up to the last block holding one of them.

    New nodes are ``{weight: dense Ŵ}`` with ``materialize``, else the packed tensors of the linear."""
    transposed = dict(linears)
    by_layer = _by_layer(roles, linears)
    outside = set(transposed) - {n for ns in by_layer.values() for n in ns}
    if outside:
        raise SurgeonError(f"shiftadd: {min(outside)} is not a linear of a decoder block")
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.max_windows)
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=CALIBRATION_BATCH, roles=roles)
    ctx.log(f"shiftadd: calibrating on {tokens.shape[0]}×{tokens.shape[1]} tokens, blocks {min(by_layer)}.."
            f"{max(by_layer)} ({len(by_layer)} quantised)")
    bits_of = ({name: params.bits for name, _ in linears} if params.bits_budget is None
               else _sensitivity_bits(eng, tokens, by_layer, params, transposed, ctx))
    new_nodes: dict[str, dict[str, Node]] = {}
    rel_w, rel_out = {}, {}
    with ctx.timed("calibrate"):
        for block in eng.blocks(tokens, layers=sorted(by_layer), record=False, progress=ctx.progress):
            names = by_layer[block.index]
            hs = _hessians(block, names, transposed)
            # narrowest Hessians first, each freed after its fit: the widest (MLP-down, 14336² = 0.8 GB at the 8B
            # shape) and its working copy are then the only ones alive (every H is of the unchanged block's
            # inputs, so the order does not change any fit)
            for name in sorted(names, key=lambda n: hs[n].shape[0]):
                w, h = _weight(block, name, transposed[name]), hs.pop(name)
                ql = quantize_gptq(w, h, bits_of[name], params.group_size, rounds=params.rounds,
                                   pot_terms=params.pot_terms, damping=params.damping, block_size=params.block_size,
                                   act_order=params.act_order, scale_layout=params.scale_layout, device=ctx.device)
                w_hat = ql.dense()
                rel_w[name] = float((w - w_hat).norm() / w.norm().clamp_min(1e-30))
                rel_out[name] = output_error(w, w_hat, h.cpu())
                stored = w_hat.T if transposed[name] else w_hat
                block.set(name, stored)  # the quantised block feeds the next one
                new_nodes[name] = _spill(eng, name, ql, stored, graph, params.materialize)
                del w, h, ql, w_hat, stored
                ctx.status(f"block {block.index} out-err {rel_out[name]:.3f}")
    ctx.report(**eng.timing())
    extra = {"weight_rel_error_mean": round(sum(rel_w.values()) / len(rel_w), 5),
             "output_rel_error_mean": round(sum(rel_out.values()) / len(rel_out), 5),
             "output_rel_error": {module_name(n): round(v, 5) for n, v in rel_out.items()},
             "calibration_tokens": int(tokens.numel())}
    return bits_of, new_nodes, extra


def _spill(eng: Engine, name: str, ql, stored: torch.Tensor, graph: Graph, materialize: bool) -> dict[str, Node]:
    """The fitted linear as lazy spill-store nodes: the dense Ŵ (graph dtype) or the packed tensors."""
    if materialize:
        return {name: eng.spill.put(name, stored.contiguous().to(graph[name].dtype), label="shiftadd")}
    return {k: eng.spill.put(k, v, label="shiftadd") for k, v in ql.tensors(module_name(name)).items()}
