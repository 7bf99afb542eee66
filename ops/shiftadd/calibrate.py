"""The calibrated (activation-aware) ShiftAdd path on the materialised model: layer by layer, each decoder layer's
linears get their Hessian H = XXᵀ/n from the calibration inputs, are fitted by :func:`quantize_gptq`, and the
quantised layer's outputs feed the next layer (ShiftAddLLM, arXiv 2406.05981; ALGORITHMS.md §7.2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from surgeon.ops.shiftadd.gptq import allocate_bits, output_error, quantize_gptq, sensitivity_score

from surgeon.errors import SurgeonError
from surgeon.formats.shiftadd import module_name

if TYPE_CHECKING:
    from surgeon.ops.shiftadd.op import Params

    from surgeon.arch import Roles
    from surgeon.context import Context
    from surgeon.graph import Graph, Node

CALIBRATION_BATCH = 8


class _StopForward(Exception):
    pass


def _layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, tokens: torch.Tensor, batch: int,
                  device: torch.device) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each calibration batch hands to the first decoder layer."""
    captured: list[tuple[tuple, dict]] = []

    def grab(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch):
                try:
                    model(input_ids=tokens[i:i + batch].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: torch.nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = layer(*args, **kwargs)
            hidden = y[0] if isinstance(y, (tuple, list)) else y
            out.append(((hidden, *args[1:]) if args else (), kwargs if args else {**kwargs,
                                                                                  "hidden_states": hidden}))
    return out


def _collect_hessians(layer: torch.nn.Module, modules: dict[str, torch.nn.Module],
                      inputs: list[tuple[tuple, dict]], device: torch.device) -> dict[str, torch.Tensor]:
    sums: dict[str, list] = {}

    def hook_for(name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float32)
            acc = sums.setdefault(name, [torch.zeros(x.shape[1], x.shape[1], device=device), 0])
            acc[0].addmm_(x.T, x)
            acc[1] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in sums]
    if missing:
        raise SurgeonError(f"shiftadd: linear {missing[0]} saw no calibration input")
    return {n: s / max(1, c) for n, (s, c) in sums.items()}


def _weight_of(module: torch.nn.Module, transposed: bool) -> torch.Tensor:
    w = module.weight.detach().float()
    return w.T if transposed else w


@dataclass
class _Calibration:
    """The materialised model cut into decoder layers, with each block linear's module."""

    modules: dict[str, torch.nn.Module]  # graph weight name -> its nn.Linear-like module
    layer_of: dict[str, int]
    layers: list[torch.nn.Module]
    inputs: list[tuple[tuple, dict]]  # what the first decoder layer receives per calibration batch
    tokens: torch.Tensor
    transposed: dict[str, bool] = field(default_factory=dict)

    def linears_of(self, i: int) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in self.modules.items() if self.layer_of.get(n) == i}


def _prepare(graph: Graph, params: Params, ctx: Context, roles: Roles, linears: list[tuple[str, bool]]
             ) -> _Calibration:
    model = ctx.module(graph, dtype="float32")
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.max_windows)
    to_module = {g: p for p, g in model._surgeon_names.items()}  # graph name -> module parameter name
    modules: dict[str, torch.nn.Module] = {}
    for name, _ in linears:
        pname = to_module.get(name)
        if pname is None:
            raise SurgeonError(f"shiftadd: {name} is not a parameter of the materialised model")
        modules[name] = model.get_submodule(pname.rsplit(".", 1)[0])
    layer_of = {name: i for i in range(roles.n_layers) for name in roles.block_linears(i)}
    layers = [_find_layer(model, modules, i, layer_of) for i in range(roles.n_layers)]
    inputs = _layer_inputs(model, layers[0], tokens, CALIBRATION_BATCH, torch.device(ctx.device))
    return _Calibration(modules, layer_of, layers, inputs, tokens, dict(linears))


def _sensitivity_bits(cal: _Calibration, params: Params, ctx: Context) -> dict[str, int]:
    """Bits per linear under ``bits_budget`` from the calibrated sensitivity scores (one forward sweep)."""
    dev = torch.device(ctx.device)
    scores, numels = {}, {}
    cur = cal.inputs
    n = len(cal.layers)
    for i in ctx.progress(range(n), total=n, description="shiftadd: sensitivity"):
        mods = cal.linears_of(i)
        hs = _collect_hessians(cal.layers[i], mods, cur, dev)
        for name, m in mods.items():
            w = _weight_of(m, cal.transposed[name]).to(dev)
            scores[name] = sensitivity_score(w, hs[name], params.damping)
            numels[name] = w.numel()
        cur = _run_layer(cal.layers[i], cur)
    return allocate_bits(scores, numels, params.bits_budget, params.bits - 1, params.bits)


def fit_calibrated(graph: Graph, params: Params, ctx: Context, roles: Roles, linears: list[tuple[str, bool]]
                   ) -> tuple[dict[str, int], dict[str, dict[str, Node]], dict[str, Any]]:
    """The activation-aware fit of every block linear: (bits per weight, new nodes per weight, report extras).

    New nodes are ``{weight: dense Ŵ}`` with ``materialize``, else the packed tensors of the linear."""
    from surgeon.graph import Const

    cal = _prepare(graph, params, ctx, roles, linears)
    n = len(cal.layers)
    ctx.log(f"shiftadd: calibrating on {cal.tokens.shape[0]}×{cal.tokens.shape[1]} tokens, {n} layers")
    bits_of = ({name: params.bits for name, _ in linears} if params.bits_budget is None
               else _sensitivity_bits(cal, params, ctx))
    new_nodes: dict[str, dict[str, Node]] = {}
    rel_w, rel_out = {}, {}
    cur = cal.inputs
    for i in ctx.progress(range(n), total=n, description="shiftadd: GPTQ-BCQ"):
        mods = cal.linears_of(i)
        hs = _collect_hessians(cal.layers[i], mods, cur, torch.device(ctx.device))
        for name, m in mods.items():
            tr = cal.transposed[name]
            w = _weight_of(m, tr)
            ql = quantize_gptq(w, hs[name], bits_of[name], params.group_size, rounds=params.rounds,
                               pot_terms=params.pot_terms, damping=params.damping, block_size=params.block_size,
                               act_order=params.act_order, scale_layout=params.scale_layout, device=ctx.device)
            w_hat = ql.dense()
            rel_w[name] = float((w - w_hat).norm() / w.norm().clamp_min(1e-30))
            rel_out[name] = output_error(w, w_hat, hs[name].cpu())
            with torch.no_grad():
                m.weight.data.copy_((w_hat.T if tr else w_hat).to(m.weight.device, m.weight.dtype))
            if params.materialize:
                dense = (w_hat.T if tr else w_hat).contiguous().to(graph[name].dtype)
                new_nodes[name] = {name: Const(dense, label="shiftadd")}
            else:
                new_nodes[name] = {k: Const(v, label="shiftadd") for k, v in ql.tensors(module_name(name)).items()}
            ctx.status(f"layer {i} out-err {rel_out[name]:.3f}")
        cur = _run_layer(cal.layers[i], cur)  # quantised outputs feed the next layer
    extra = {"weight_rel_error_mean": round(sum(rel_w.values()) / len(rel_w), 5),
             "output_rel_error_mean": round(sum(rel_out.values()) / len(rel_out), 5),
             "output_rel_error": {module_name(n): round(v, 5) for n, v in rel_out.items()},
             "calibration_tokens": int(cal.tokens.numel())}
    return bits_of, new_nodes, extra


def _find_layer(model: torch.nn.Module, modules: dict[str, torch.nn.Module], i: int,
                layer_of: dict[str, int]) -> torch.nn.Module:
    """The decoder layer module holding layer ``i``'s linears: their deepest common ancestor that is an item of
    a ModuleList."""
    targets = [m for n, m in modules.items() if layer_of.get(n) == i]
    if not targets:
        raise SurgeonError(f"shiftadd: layer {i} has no linears")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList):
            for child in mod:
                owned = {id(m) for m in child.modules()}
                if all(id(t) in owned for t in targets):
                    return child
    raise SurgeonError(f"shiftadd: cannot find the decoder layer module of layer {i}")
