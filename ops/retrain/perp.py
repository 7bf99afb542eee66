"""PERP: parameter-efficient retraining after pruning (Zimmer, Andoni, Spiegel & Pokutta, arXiv 2312.15230;
``ZIB-IOL/PERP``).

After pruning, only biases, norm parameters and sparsity-preserving adapters on the pruned linears are trained
(MaskLoRA r=16, α=32 by default, or ScaleLoRA, or none), then the adapters are merged exactly: W' = W + s·(M⊙BA)
or W ⊙ BA, so every zero of the pruned model is still zero (checked before the graph is returned). In retrain mode
the (unpruned) output head also gets a classical LoRA (W + s·BA, same r and α), as in the reference's default
``peft_use_lm_head=True``; with tied embeddings its merge changes the shared tensor, as PEFT's in-place merge does.

Modes:
- ``retrain``: causal-LM loss over token windows of ``data``; AdamW (weight decay 0), linear schedule with warmup.
- ``reconstruct``: block by block, minimise the MSE between the pruned block (with adapters) and the dense block
  on the same inputs, the inputs coming from the already retrained pruned prefix; each block's outputs feed the
  next. Needs the dense weights, i.e. a ``prune.*`` step earlier in the same run (or Python call chain).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from surgeon.ops.prune.common import ARCH_HELP, EXCLUDE_HELP, prune_targets, roles, sparsity_facts
from surgeon.ops.retrain.adapters import Attached, attach, detach, merged_weight
from torch import nn

from surgeon.context import Context
from surgeon.engine import dist
from surgeon.engine.fsdp import full_tensor, gather_full, rank_slice, shard_for_training
from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph
from surgeon.registry import register

from .edit_loss import edit_term

T = TypeVar("T")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Training text: a .txt/.jsonl file, a datasets folder, or 'model:N' "
                      "(N sequences sampled from the run's input model, i.e. the dense model when "
                                  "pruning and PERP run in one recipe).")
    steps: int = Field(30, ge=1, description="Optimizer steps (in reconstruct mode: per block). Only ~4 % of the "
                       "weights train and most of the recovery comes in the first steps; each step costs about "
                       "three forward passes plus a full-size weight gradient per pruned linear (MaskLoRA's mask "
                       "does not factor), so 30 steps of 4 × 128 tokens are the CPU default.")
    lora: Literal["mask", "scale", "none"] = Field("mask", description="Adapter on the pruned linears: mask "
                                                   "(MaskLoRA, W + s·(M⊙BA)), scale (ScaleLoRA, W⊙BA) or none "
                                                   "(biases and norms only).")
    rank: int = Field(16, ge=1, description="Adapter rank r.")
    alpha: float = Field(32.0, gt=0, description="MaskLoRA scale numerator: s = alpha / rank (ScaleLoRA has none).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate of AdamW.")
    warmup: float = Field(0.1, ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up "
                          "linearly; it then decays linearly to zero.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(4, ge=1, description="Windows per step.")
    seqlen: int = Field(128, ge=2, le=2048, description="Tokens per window (capped by the model's context and 2048).")
    max_windows: int = Field(256, ge=1, description="At most this many windows are cut from the data.")
    mode: Literal["retrain", "reconstruct"] = Field("retrain", description="retrain: language-model loss on the "
                                                    "whole model; reconstruct: per block, MSE to the dense block "
                                                    "(low memory; needs a prune step earlier in the same run).")
    checkpointing: bool = Field(True, description="Gradient checkpointing in retrain mode: keep only each "
                                "block's input and recompute the block in the backward pass (memory of one block "
                                "instead of all of them, about a third more time).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="retrain mode: dtype the frozen model "
                                                  "is held in. bfloat16 halves its memory: the forward runs under "
                                                  "bf16 autocast while adapters, norms, biases and AdamW stay fp32 "
                                                  "(mixed precision, as the reference's AMP); adapted linears are "
                                                  "merged from their bf16 values.")
    train_norms: bool = Field(True, description="Train the norm weights (and biases) of LayerNorm/RMSNorm.")
    train_biases: bool = Field(True, description="Train the biases of all linear layers (OPT, GPT-2, Qwen2).")
    head_lora: bool = Field(True, description="retrain mode: also train a plain LoRA (rank, alpha) on the output "
                            "head and merge it densely, as the reference (peft_use_lm_head); with tied embeddings "
                            "the merged delta lands in the shared embedding. Skipped in reconstruct mode (so is "
                            "the reference's).")
    include: list[str] | None = Field(None, description="Selectors of the linears that get adapters. Default: "
                                      "every block linear.")
    exclude: list[str] = Field(default_factory=list, description=EXCLUDE_HELP)
    arch: dict[str, Any] | None = Field(None, description=ARCH_HELP)
    edit_loss: bool | None = Field(None, description="retrain mode: add the knowledge edits made earlier in the "
                                   "same run to the loss (mean NLL of each edited fact's target after its prompt, "
                                   "times edit_loss_weight), so retraining keeps them. Default: on when the run "
                                   "contains an edit step.")
    edit_loss_weight: float = Field(1.0, gt=0, description="Weight of the edit term next to the language-model "
                                    "loss.")

    @model_validator(mode="after")
    def _something_trains(self) -> Params:
        head = self.head_lora and self.mode == "retrain"
        if self.lora == "none" and not self.train_norms and not self.train_biases and not head:
            raise ValueError("nothing to train: lora=none with train_norms and train_biases off (and no head_lora "
                             "in retrain mode)")
        return self


# --- which parameters train ----------------------------------------------------------------------------------

def extra_trainables(model: nn.Module, *, norms: bool, biases: bool, within: nn.Module | None = None,
                     ) -> dict[str, nn.Parameter]:
    """``{graph name: parameter}`` of norm parameters and biases (inside ``within`` when given)."""
    names: dict[str, str] = getattr(model, "_surgeon_names", {}) or {}
    scope = {id(m) for m in within.modules()} if within is not None else None
    out: dict[str, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        if scope is not None and id(mod) not in scope:
            continue
        if "parametrizations" in mod_name.split("."):
            continue
        is_norm = "norm" in type(mod).__name__.lower()
        for leaf, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            if full not in names or not p.is_floating_point():
                continue
            if (norms and is_norm) or (biases and leaf == "bias"):
                out[names[full]] = p
    return out


def count_parameters(params) -> int:
    seen: set[int] = set()
    n = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _schedule(steps: int, warmup: float):
    w = round(warmup * steps)

    def factor(s: int) -> float:
        if s < w:
            return (s + 1) / w
        return max(0.0, (steps - s) / max(1, steps - w))

    return factor


def optimizer(params: list[nn.Parameter], p: Params, steps: int, lr: float | None = None):
    """AdamW at ``p.lr`` (or ``lr``), linear warmup over ``p.warmup`` of the steps, then linear decay to 0."""
    opt = torch.optim.AdamW(params, lr=p.lr if lr is None else lr, weight_decay=p.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, p.warmup))


# --- the two training modes -------------------------------------------------------------------------------------

def iter_batches(batches: list[T], steps: int, seed: int) -> Iterator[T]:
    """``steps`` batches cycling through a fixed shuffled order."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        yield batches[order.pop()]


def module_of(model: nn.Module, graph_name: str) -> tuple[nn.Module, str, str]:
    """(module, parameter leaf, module path) of the parameter that a graph tensor name became."""
    names: dict[str, str] = getattr(model, "_surgeon_names", {}) or {}
    param = next((p for p, g in names.items() if g == graph_name), None)
    if param is None:
        raise SurgeonError(f"{graph_name!r}: not a parameter of the materialised module")
    path, _, leaf = param.rpartition(".")
    return model.get_submodule(path), leaf, path


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def perp_retrain(model: nn.Module, tokens: torch.Tensor, trainable: list[nn.Parameter], p: Params, *,
                 seed: int = 0, progress=None, status=None, extra_loss=None, sharded: bool = False) -> list[float]:
    """Causal-LM retraining of ``trainable`` only (plus ``extra_loss(model)`` when given, e.g. the edit term).
    ``sharded`` (FSDP2 over ``torchrun`` processes): each rank trains on its slice of every batch. Returns the
    loss of every step (this rank's)."""
    dev = next(model.parameters()).device
    opt, sched = optimizer(trainable, p, p.steps)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    steps = range(p.steps) if progress is None else progress(range(p.steps), p.steps, "PERP")
    for _ in steps:
        idx = []
        while len(idx) < min(p.batch_size, tokens.shape[0]):
            if not order:
                order = torch.randperm(tokens.shape[0], generator=g).tolist()
            idx.append(order.pop())
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p.dtype == "bfloat16"):
            loss = lm_loss(model, tokens[rank_slice(idx) if sharded else idx].to(dev))
            if extra_loss is not None:
                loss = loss + extra_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if status is not None:
            status(f"loss {losses[-1]:.3f}")
    model.eval()
    return losses


# --- graph wiring ---------------------------------------------------------------------------------------------

def _attach_head(model: nn.Module, graph: Graph, p: Params, adapted: list[str],
                 ctx: Context) -> tuple[str, Attached] | None:
    """A plain LoRA on the output head (``lm_head``, or the tied embedding it shares): (graph name, adapter).

    None when the model has no separate output projection or the head is already among the adapted linears."""
    r = roles(graph, p.arch, ctx=ctx)
    name = r.lm_head or (r.embed if r.tied else None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if name is None or head is None or name in adapted or not isinstance(getattr(head, "weight", None), nn.Parameter):
        return None
    if tuple(head.weight.shape) != tuple(graph[name].shape):
        raise SurgeonError(f"retrain.perp head_lora: output head {list(head.weight.shape)} does not match {name} "
                           f"{list(graph[name].shape)}")
    return name, attach(head, "weight", "plain", p.rank, p.alpha)


def _checkpointing(model: nn.Module, on: bool) -> bool:
    """Switch transformers' per-block activation checkpointing; False when the model class has none.
    (transformers 5.x names it ``activation_checkpointing_*``; 4.x ``gradient_checkpointing_*``.)"""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{kind}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{kind}_checkpointing_disable")()
    return True


def _fp32_trainables(attached: list[Attached], extras: dict[str, nn.Parameter]) -> None:
    """Trained parameters in fp32 whatever the model's dtype (mixed precision: fp32 master values)."""
    for a in attached:
        a.adapter.float()
    for q in extras.values():
        if q.dtype != torch.float32:
            q.data = q.data.float()


@dataclass
class _Trained:
    """What a training mode hands back: merged weights of the adapted linears, trained norms/biases, the head."""

    merged: dict[str, torch.Tensor]
    extras: dict[str, nn.Parameter]
    n_trainable: int
    head: tuple[str, torch.Tensor] | None = None  # (graph name, merged weight) of the head LoRA


def _retrain(model: nn.Module, graph: Graph, names: list[str], tokens: torch.Tensor, params: Params, ctx: Context,
             facts: dict[str, Any]) -> _Trained:
    """retrain mode: adapters on ``names`` (and the head), causal-LM loss, adapters merged back."""
    attached: list[Attached] = []
    if params.lora != "none":
        attached = [attach(*module_of(model, n)[:2], params.lora, params.rank, params.alpha) for n in names]
    extras = extra_trainables(model, norms=params.train_norms, biases=params.train_biases)
    head = _attach_head(model, graph, params, names, ctx) if params.head_lora else None
    if head is not None:
        facts["head_lora"] = {"tensor": head[0], "tied": head[0] != roles(graph, params.arch, ctx=ctx).lm_head}
    trainable = [q for a in attached for q in a.adapter.parameters()] + list(extras.values())
    if head is not None:
        trainable += list(head[1].adapter.parameters())
    _fp32_trainables([*attached, *([head[1]] if head is not None else [])], extras)
    for q in trainable:
        q.requires_grad_(True)
    n_trainable = count_parameters(trainable)
    # several torchrun processes: FSDP2 over the decoder blocks; it replaces the parameters by sharded ones, so
    # the trained ones are collected again (the model is discarded after the merge)
    sharded = shard_for_training(model, roles(graph, params.arch, ctx=ctx).prefixes, ctx.device)
    if sharded:
        facts["fsdp_processes"] = dist.world()
        extras = extra_trainables(model, norms=params.train_norms, biases=params.train_biases)
        trainable = [q for a in attached for q in a.adapter.parameters()] + list(extras.values())
        if head is not None:
            trainable += list(head[1].adapter.parameters())
    checkpointed = params.checkpointing and _checkpointing(model, True)
    extra = edit_term(graph, params.edit_loss, params.edit_loss_weight, ctx, facts)
    with ctx.timed("retrain"):
        losses = perp_retrain(model, tokens, trainable, params, seed=ctx.seed, progress=ctx.progress,
                              status=ctx.status, extra_loss=extra, sharded=sharded)
    if checkpointed:
        _checkpointing(model, False)
    facts["gradient_checkpointing"] = bool(checkpointed)
    if sharded:  # whole tensors again for the merge; the sharded model itself is not used afterwards
        gather_full(model)
        extras = {n: full_tensor(q.detach()) for n, q in extras.items()}
    merged = {}
    for n, a in zip(names, attached):
        merged[n] = merged_weight(a)
        if not sharded:
            detach(a, merged[n])
    head_out = None
    if head is not None:
        head_weight = merged_weight(head[1])
        if not sharded:
            detach(head[1], head_weight)
        head_out = (head[0], head_weight)
    k = max(1, len(losses) // 10)
    facts.update(loss_first=round(sum(losses[:k]) / k, 4), loss_last=round(sum(losses[-k:]) / k, 4))
    return _Trained(merged, extras, n_trainable, head_out)


def _write_back(graph: Graph, names: list[str], trained: _Trained,
                zero_before: dict[str, torch.Tensor]) -> tuple[Graph, dict[str, tuple[int, int]]]:
    """The graph with the trained tensors as constants; refuses a merge that fills a pruned zero."""
    out = graph.copy()
    per_tensor = {}
    for n in names:
        if n not in trained.merged:  # lora=none: the linear itself did not train
            per_tensor[n] = (int(zero_before[n].sum()), zero_before[n].numel())
            continue
        new = trained.merged[n].cpu().to(graph[n].dtype)
        bad = int((zero_before[n] & (new != 0)).sum())
        if bad:  # the whole point of MaskLoRA/ScaleLoRA: refuse to write a densified model
            raise SurgeonError(f"internal: merging the adapter of {n!r} created {bad} new non-zeros")
        out.replace(n, Const(new, label="perp"))
        per_tensor[n] = (int((new == 0).sum()), new.numel())
    for n, q in trained.extras.items():
        out.replace(n, Const(q.detach().cpu().to(graph[n].dtype), label="perp"))
    if trained.head is not None:
        name, weight = trained.head
        out.replace(name, Const(weight.cpu().to(graph[name].dtype), label="perp.head_lora"))
    return out, per_tensor


@register("retrain.perp", Params, model_level=True,
          summary="PERP: retrain norms, biases and MaskLoRA after pruning.")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """PERP: retrain norms, biases and MaskLoRA after pruning."""
    names = prune_targets(graph, params.include, params.exclude, params.arch, ctx=ctx)
    r = roles(graph, params.arch, ctx=ctx)
    tokens = ctx.tokens(params.data, graph, seqlen=params.seqlen, max_windows=params.max_windows)
    torch.manual_seed(ctx.seed)
    facts: dict[str, Any] = {"mode": params.mode, "lora": params.lora, "rank": params.rank, "dtype": params.dtype,
                             "windows": int(tokens.shape[0]), "seqlen": int(tokens.shape[1])}
    if params.mode == "reconstruct":
        from surgeon.ops.retrain.reconstruct import reconstruct

        out, per_tensor, rec = reconstruct(graph, names, tokens, params, ctx, r)
        facts.update(rec)
        n_trainable = facts.pop("trainable_parameters")
        total = sum(math.prod(graph[n].shape) for n in graph.names() if graph[n].dtype.is_floating_point)
    else:
        model = ctx.module(graph, dtype=params.dtype)
        for q in model.parameters():
            q.requires_grad_(False)
        total = count_parameters(model.parameters())
        zero_before = {n: (getattr(*module_of(model, n)[:2]).detach() == 0).cpu() for n in names}
        trained = _retrain(model, graph, names, tokens, params, ctx, facts)
        out, per_tensor = _write_back(graph, names, trained, zero_before)
        n_trainable = trained.n_trainable
    ctx.report(**facts, trainable_parameters=n_trainable, total_parameters=total,
               trainable_fraction=round(n_trainable / total, 6), **sparsity_facts(per_tensor))
    return out
