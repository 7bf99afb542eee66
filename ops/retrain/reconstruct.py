"""PERP's reconstruct mode on the model engine (:mod:`surgeon.engine`; Zimmer et al., arXiv 2312.15230).

Block by block: the dense block's outputs on the block's inputs (which come from the already retrained pruned
prefix) are the targets; the block's trainable parameters (norms, biases, MaskLoRA/ScaleLoRA on its pruned
linears) minimise the MSE of the pruned block's outputs to them; the adapters are merged and the retrained block's
outputs feed the next block. Only one block is loaded at a time; trained tensors go to the engine's spill store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from surgeon.ops.prune.common import Pruned
from surgeon.ops.retrain.adapters import attach, detach, merged_weight
from surgeon.ops.retrain.perp import Params, count_parameters, iter_batches, optimizer
from torch import nn

from surgeon import engine
from surgeon.errors import SurgeonError
from surgeon.graph import Graph

if TYPE_CHECKING:
    from surgeon.context import Context
    from surgeon.engine import Block, HiddenStore
    from surgeon.graph import Node


@dataclass
class Reconstructed:
    """Lazy nodes of every tensor that trained, pruned-zero counts per adapted linear, and the facts to report."""

    nodes: dict[str, Node] = field(default_factory=dict)
    per_tensor: dict[str, tuple[int, int]] = field(default_factory=dict)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    n_trainable: int = 0


def block_trainables(block: Block, *, norms: bool, biases: bool) -> dict[str, nn.Parameter]:
    """``{graph name: parameter}`` of the block's norm parameters and biases."""
    out = {}
    for name in block.names:
        mod, leaf = block.module_of(name)
        p = block.param(name)
        if not p.is_floating_point():
            continue
        if (norms and "norm" in type(mod).__name__.lower()) or (biases and leaf == "bias"):
            out[name] = p
    return out


def _dense_of(graph: Graph, name: str) -> torch.Tensor:
    node = graph[name]
    if not isinstance(node, Pruned):
        raise SurgeonError(f"retrain.perp mode=reconstruct: {name!r} has no dense weights in this run; put a "
                           "prune.magnitude / prune.wanda step before retrain.perp in the same recipe, or use "
                           "mode=retrain")
    return Graph({name: node.dense}).value(name)


def _dense_targets(block: Block, graph: Graph, names: list[str]) -> HiddenStore:
    """The dense block's outputs on the block's inputs (the pruned weights are put back afterwards)."""
    pruned = {}
    with torch.no_grad():
        for n in names:
            w = block.param(n)
            pruned[n] = w.detach().clone()
            w.copy_(_dense_of(graph, n).to(w.device, w.dtype))
        targets = block.forward(keep=True)
        for n in names:
            block.param(n).copy_(pruned[n])
    block.outputs = None  # the dense outputs never feed the next block
    return targets


def _relative_error(block: Block, targets: HiddenStore) -> float:
    num = den = 0.0
    with torch.no_grad():
        for j in range(block.n_batches):
            mb, x = block.input(j)
            y = targets.get(j, x.device)
            num += float(((block.call(x, mb) - y) ** 2).sum())
            den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def _train(block: Block, targets: HiddenStore, params: list[nn.Parameter], p: Params, seed: int, status) -> None:
    opt, sched = optimizer(params, p, p.steps)
    block.module.train()
    for j in iter_batches(list(range(block.n_batches)), p.steps, seed):
        mb, x = block.input(j)
        loss = torch.nn.functional.mse_loss(block.call(x, mb), targets.get(j, x.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if status is not None:
            status(f"block {block.index} loss {float(loss.detach()):.3g}")
    block.module.eval()


def _reconstruct_block(block: Block, graph: Graph, names: list[str], p: Params, seed: int, res: Reconstructed,
                       spill, status) -> None:
    """Fit one block to its dense targets, merge its adapters in place, spill what trained."""
    targets = _dense_targets(block, graph, names)
    res.before.append(_relative_error(block, targets))
    zero = {n: (block.param(n).detach() == 0).cpu() for n in names}
    extras = block_trainables(block, norms=p.train_norms, biases=p.train_biases)
    attached = [attach(*block.module_of(n), p.lora, p.rank, p.alpha) for n in names] if p.lora != "none" else []
    trainable = [q for a in attached for q in a.adapter.parameters()] + list(extras.values())
    for q in extras.values():
        q.requires_grad_(True)
    res.n_trainable += count_parameters(trainable)
    if trainable:
        _train(block, targets, trainable, p, seed, status)
    for q in extras.values():
        q.requires_grad_(False)
    for n, a in zip(names, attached):
        detach(a, merged_weight(a))
    res.after.append(_relative_error(block, targets))
    targets.clear()
    for n in names:
        new = block.param(n).detach().cpu().to(graph[n].dtype)
        if attached:
            bad = int((zero[n] & (new != 0)).sum())
            if bad:  # the whole point of MaskLoRA/ScaleLoRA: refuse to write a densified model
                raise SurgeonError(f"internal: merging the adapter of {n!r} created {bad} new non-zeros")
            res.nodes[n] = spill.put(n, new, label="perp")
        res.per_tensor[n] = (int((new == 0).sum()), new.numel())
    for n, q in extras.items():
        res.nodes[n] = spill.put(n, q.detach().to(graph[n].dtype), label="perp")


def reconstruct(graph: Graph, names: list[str], tokens: torch.Tensor, p: Params, ctx: Context,
                roles) -> tuple[Graph, dict[str, tuple[int, int]], dict[str, Any]]:
    """reconstruct mode on the engine: (graph with the trained tensors as lazy nodes, zeros per adapted linear,
    facts to report)."""
    by_layer: dict[int, list[str]] = {}
    for n in names:
        i = next((i for i in range(roles.n_layers) if n.startswith(roles.layer_prefix(i))), None)
        if i is None:
            raise SurgeonError(f"retrain.perp mode=reconstruct: {n!r} is not inside a block")
        by_layer.setdefault(i, []).append(n)
    for n in names:
        if not isinstance(graph[n], Pruned):
            _dense_of(graph, n)  # refuses before any work
    eng = engine.from_context(graph, ctx, dtype="float32", micro_batch=p.batch_size, roles=roles)
    res = Reconstructed()
    with ctx.timed("reconstruct"):
        for block in eng.blocks(tokens, record=False, progress=ctx.progress):
            _reconstruct_block(block, graph, by_layer.get(block.index, []), p, ctx.seed + block.index, res,
                               eng.spill, ctx.status)
    ctx.report(**eng.timing())
    out = graph.copy()
    for n, node in res.nodes.items():
        out.replace(n, node)
    facts = {"block_error_before": [round(x, 6) for x in res.before],
             "block_error_after": [round(x, 6) for x in res.after], "trainable_parameters": res.n_trainable}
    return out, res.per_tensor, facts
