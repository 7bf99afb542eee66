"""Uptraining of a recursive (``tie``) model by distillation from the original (``retrain.distill``).

Bae et al., *Relaxed Recursive Transformers* (ICLR 2025, arXiv 2410.20672), uptrain the tied model after the
conversion (15-60 B tokens). Here, with the original model as the teacher, the shared block, the per-layer LoRA
factors and the norms of a ``tie`` output train to match the teacher's next-token distribution (forward KL with
temperature, :mod:`surgeon.ops.retrain.kd`), with PERP's optimiser (AdamW, linear warmup then linear decay) and
activation checkpointing. Before those end-to-end steps, a block-wise stage (:mod:`.blockwise`, on by default)
fits each shared block, with its layers' LoRA factors and norms, to the teacher's layers from the teacher's own
hidden states: one block per step instead of the whole model and its head. The output keeps the input's form
(compact, tied-base + ``lora/``, or materialised; :mod:`surgeon.ops.retrain.recursive`). Held-out perplexity is measured every
``eval_every`` steps (and before and after) and goes to the report and the card.

The teacher runs on the model engine (:mod:`surgeon.engine`), never as a whole module: its held-out perplexity
is the engine's own score (as ``surgeon eval``), then every block runs once over the windows the training
schedule uses (one block resident at a time) and the last block's outputs are kept (spilled to disk past the
engine's budget). With ``top_k`` > 0 the head turns them into the top-k table (``n·L·k`` values and ids, the
output embedding a slice at a time, never ``[n, L, V]`` logits) and they are dropped; with ``top_k`` = 0 (exact
KL) the head runs on each step's windows (one batch of full-vocabulary logits, as the student's own).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from surgeon import engine
from surgeon.context import Context
from surgeon.engine.core import layer_path
from surgeon.engine.outputs import block_states, last_hidden, top_logits
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.metrics import engine_scores, perplexity
from surgeon.registry import register

from .blockwise import SlotFit, fit_slot, slot_layers
from .kd import Targets, TopK, kd_loss
from .perp import _checkpointing, count_parameters, optimizer
from .recursive import Recursion, RecursiveModule, build_module, read_recursion, write_form

OP = "retrain.distill"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="The teacher: a name in the recipe's `models:` or a checkpoint "
                                "(folder, file, repo id, builtin:). Default: the run's input model when a tie step "
                                "earlier in this run made the student, else the input named 'teacher'.")
    data: str = Field(description="Training text: a .txt/.jsonl file, a datasets folder, or 'model:N' (N sequences "
                      "sampled from the teacher).")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    warmup: float = Field(0.1, ge=0, lt=1, description="Fraction of the steps warming the learning rate up "
                          "linearly; it then decays linearly to zero.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(4, ge=1, description="Windows per step.")
    seqlen: int = Field(128, ge=2, le=2048, description="Tokens per window.")
    max_windows: int = Field(256, ge=1, description="At most this many training windows are cut from the data.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of teacher and student; the loss is "
                               "scaled by temperature^2.")
    top_k: int = Field(0, ge=0, description="0: exact KL over the whole vocabulary (the teacher's head runs on "
                       "every step's windows). k > 0: keep the teacher's k largest logits per position, computed "
                       "once for the windows training uses, and free the teacher before training.")
    teacher_batch: int = Field(4, ge=1, description="Windows per micro-batch of the teacher's block-by-block pass.")
    train_shared: bool = Field(True, description="Train the shared block's linear weights (and biases).")
    train_lora: bool = Field(True, description="Train the per-layer LoRA factors A and B.")
    train_norms: bool = Field(True, description="Train norm weights: shared, per-layer (untie_norms) and final.")
    checkpointing: bool = Field(True, description="Activation checkpointing per block (less memory, about a "
                                "third more time).")
    seed: int = Field(0, description="Offset added to the run's --seed for the window order.")
    eval_data: str | None = Field(None, description="Held-out text for the perplexity curve. Default: the last "
                                  "eval_windows windows of data, kept out of training.")
    eval_windows: int = Field(4, ge=1, description="Held-out windows scored at each evaluation.")
    eval_every: int = Field(0, ge=0, description="Score held-out perplexity every N steps (0: before and after "
                            "training only).")
    blockwise_epochs: float = Field(1.0, ge=0, description="Passes of the block-wise stage before the end-to-end "
                                    "steps: each shared block, with the LoRA factors and norms of the layers using "
                                    "it, is fitted to the teacher's layers from the teacher's hidden states "
                                    "(relative squared error; one teacher micro-batch per step). 0: off.")
    blockwise_windows: int = Field(256, ge=1, description="Training windows the block-wise stage uses (the first "
                                   "ones); the teacher's hidden states at every layer are kept for them (spilled "
                                   "to disk past the engine's budget).")
    blockwise_lr: float = Field(2e-3, gt=0, description="Peak learning rate of the block-wise stage (same warmup "
                                "and decay as the end-to-end steps, per block).")

    @model_validator(mode="after")
    def _something_trains(self) -> Params:
        if not (self.train_shared or self.train_lora or self.train_norms):
            raise ValueError("nothing to train: train_shared, train_lora and train_norms are all off")
        return self


# --- inputs ---------------------------------------------------------------------------------------------------
def _is_tied(g: Graph) -> bool:
    return isinstance(g.config.get("recursion"), dict) or "recursion.json" in g.extra_files \
        or "recursion.json" in g.side_files


def resolve_teacher(graph: Graph, params: Params, ctx: Context) -> tuple[str, Graph]:
    """(how the teacher was named, its graph)."""
    if params.teacher is not None:
        if params.teacher in ctx.graphs and ctx.graphs[params.teacher] is not graph:
            return params.teacher, ctx.graphs[params.teacher]
        return params.teacher, Graph.from_checkpoint(ctx.open_source(params.teacher))
    if ctx.origin is not None and ctx.origin is not graph and not _is_tied(ctx.origin):
        return "the run's input model", ctx.origin
    if "teacher" in ctx.graphs:
        return "teacher", ctx.graphs["teacher"]
    raise SurgeonError(f"{OP}: no teacher: pass --teacher PATH (the original model), name one in the recipe "
                       "(models: {student: ..., teacher: ...}), or tie and distill in one recipe")


def check_vocab(student: Graph, teacher: Graph) -> None:
    sv, tv = student.config.get("vocab_size"), teacher.config.get("vocab_size")
    if sv != tv:
        raise SurgeonError(f"{OP}: the teacher's vocabulary ({tv} tokens, config vocab_size) differs from the "
                           f"student's ({sv}); distillation needs the same tokenizer")


def trainable_params(rm: RecursiveModule, p: Params) -> dict[str, torch.nn.Parameter]:
    wanted = {"shared": p.train_shared, "lora": p.train_lora, "norm": p.train_norms, "other": False}
    return {n: q for n, q in rm.params.items() if wanted[rm.kinds[n]]}


def _windows(graph: Graph, teacher: Graph, p: Params, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows and held-out windows (``model:N`` samples come from the teacher)."""
    data_ctx = dataclasses.replace(ctx, origin=teacher, origin_fingerprint=None)
    held = None
    if p.eval_data is not None:
        held = data_ctx.tokens(p.eval_data, graph, seqlen=p.seqlen, max_windows=p.eval_windows)
        return data_ctx.tokens(p.data, graph, seqlen=p.seqlen, max_windows=p.max_windows), held
    tokens = data_ctx.tokens(p.data, graph, seqlen=p.seqlen, max_windows=p.max_windows + p.eval_windows)
    if tokens.shape[0] <= p.eval_windows:
        raise SurgeonError(f"{OP}: data {p.data!r} gives {tokens.shape[0]} windows of {p.seqlen} tokens, not more "
                           f"than eval_windows={p.eval_windows}; give more text, a smaller seqlen, or eval_data")
    return tokens[: -p.eval_windows], tokens[-p.eval_windows:]


# --- training -------------------------------------------------------------------------------------------------
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def window_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The windows of every step: shuffled passes over the ``n`` windows (a fresh permutation from the seeded
    generator whenever the last one is used up), ``min(batch_size, n)`` windows per step."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    schedule = []
    for _ in range(steps):
        idx: list[int] = []
        while len(idx) < min(batch_size, n):
            if not order:
                order = torch.randperm(n, generator=g).tolist()
            idx.append(order.pop())
        schedule.append(idx)
    return schedule


def distill(model: torch.nn.Module, windows: torch.Tensor, targets, trainable: list[torch.nn.Parameter],
            p: Params, *, schedule: list[list[int]], evaluate, progress=None, status=None
            ) -> tuple[list[float], list[list]]:
    """Minimise τ²·KL(teacher ‖ student) over ``windows``, step s on ``windows[schedule[s]]``; ``targets(idx)``
    gives the teacher's targets for ``windows[idx]``; ``evaluate()`` the held-out perplexity. Returns the
    per-step losses and the curve ``[[step, perplexity], ...]``."""
    dev = next(model.parameters()).device
    opt, sched = optimizer(trainable, p, p.steps)
    losses: list[float] = []
    curve = [[0, evaluate()]]
    model.train()
    steps = range(p.steps) if progress is None else progress(range(p.steps), p.steps, "distill")
    for step in steps:
        idx = schedule[step]
        target = targets(idx)
        loss = kd_loss(_logits(model, windows[idx].to(dev)), target, p.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (p.eval_every and (step + 1) % p.eval_every == 0) or step + 1 == p.steps:
            model.eval()
            curve.append([step + 1, evaluate()])
            model.train()
        if status is not None:
            status(f"KL {losses[-1]:.3f}, held-out ppl {curve[-1][1]:.4g}")
    model.eval()
    return losses, curve


def engine_teacher(teacher: Graph, windows: torch.Tensor, held: torch.Tensor, schedule: list[list[int]],
                   p: Params, ctx: Context) -> tuple[float, Callable[[list[int]], Targets]]:
    """(the teacher's held-out perplexity, ``idx -> targets``) from the model engine, block by block: the
    windows the schedule uses run through every block once; top-k tables, or the head per step (exact KL)."""
    eng = engine.from_context(teacher, ctx, dtype="float32", micro_batch=p.teacher_batch)
    scores = engine_scores(eng, held, None, None, progress=ctx.progress)
    ppl = round(float(scores["perplexity"]["perplexity"]), 4)
    used = sorted({i for idx in schedule for i in idx})
    row = {w: r for r, w in enumerate(used)}
    dev = torch.device(ctx.device)
    if p.top_k:
        values, indices = top_logits(eng, windows[used], p.top_k, progress=ctx.progress)
        table = TopK(torch.stack(values), torch.stack(indices))
        return ppl, lambda idx: TopK(table.values[[row[i] for i in idx]].to(dev),
                                     table.indices[[row[i] for i in idx]].to(dev))
    hidden = last_hidden(eng, windows[used], progress=ctx.progress)
    head = eng.head_weights()

    def full(idx: list[int]) -> Targets:
        return hidden.logits([row[i] for i in idx], head).to(dev)

    return ppl, full


def blockwise_stage(rm: RecursiveModule, rec: Recursion, chosen: dict[str, torch.nn.Parameter], teacher: Graph,
                    windows: torch.Tensor, p: Params, ctx: Context) -> list[SlotFit]:
    """The block-wise stage (:mod:`.blockwise`): the teacher's states at every layer for the first
    ``blockwise_windows`` windows, then each slot fitted in turn (its steps: ``blockwise_epochs`` passes over
    the teacher's micro-batches)."""
    eng = engine.from_context(teacher, ctx, dtype="float32", micro_batch=p.teacher_batch)
    states = block_states(eng, windows[: p.blockwise_windows], progress=ctx.progress)
    dev = torch.device(ctx.device)
    trainable = {id(q) for q in chosen.values()}
    steps = max(1, math.ceil(p.blockwise_epochs * states.n_batches))
    fits = []
    try:
        slots = slot_layers(rec.slots)
        for k, layers in ctx.progress(slots.items(), len(slots), "blockwise"):
            mods = {i: rm.model.get_submodule(layer_path(rm.model, rec.layer(i))) for i in layers}
            params = list({id(q): q for m in mods.values() for q in m.parameters() if id(q) in trainable}.values())
            if not params:
                continue
            fits.append(fit_slot(k, mods, params, states, steps=steps, seed=ctx.seed_for(p.seed) + k, device=dev,
                                 make_optimizer=lambda ps, n: optimizer(ps, p, n, lr=p.blockwise_lr)))
            ctx.status(f"block {k}: fit error {fits[-1].error_before:.3f} -> {fits[-1].error_after:.3f}")
    finally:
        states.clear()
    return fits


def _ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return round(float(perplexity(model, windows, batch_size=max(1, min(4, windows.shape[0])))["perplexity"]), 4)


# --- the op -----------------------------------------------------------------------------------------------------
def _facts(rec: Recursion, who: str, windows: torch.Tensor, held: torch.Tensor, losses: list[float],
           curve: list[list], teacher_ppl: float, p: Params, n_trainable: int, total: int, secs: float) -> dict:
    k = max(1, len(losses) // 10)
    return {"form": rec.form, "teacher": who, "steps": p.steps, "tokens": p.steps * p.batch_size * p.seqlen,
            "windows": int(windows.shape[0]), "heldout_windows": int(held.shape[0]), "seqlen": p.seqlen,
            "temperature": p.temperature, "top_k": p.top_k, "trainable_parameters": n_trainable,
            "total_parameters": total, "kl_first": round(sum(losses[:k]) / k, 4),
            "kl_last": round(sum(losses[-k:]) / k, 4), "teacher_perplexity": teacher_ppl,
            "perplexity_before": curve[0][1], "perplexity_after": curve[-1][1], "curve": curve,
            "train_seconds": round(secs, 1)}


@register(OP, Params, model_level=True,
          summary="Uptrain a tie output toward the original by distillation (shared block, LoRA, norms).")
def apply(graph: Graph, params: Params, ctx: Context) -> Graph:
    """Uptrain a tie output (shared block, per-layer LoRA, norms) to match the original model's logits."""
    rec = read_recursion(graph, ctx, OP)
    who, teacher_graph = resolve_teacher(graph, params, ctx)
    check_vocab(graph, teacher_graph)
    windows, held = _windows(graph, teacher_graph, params, ctx)
    schedule = window_schedule(windows.shape[0], params.batch_size, params.steps, ctx.seed_for(params.seed))
    torch.manual_seed(ctx.seed_for(params.seed))
    rm = build_module(graph, rec, ctx)
    chosen = trainable_params(rm, params)
    if not chosen:
        raise SurgeonError(f"{OP}: the student has none of the parameters chosen to train")
    for q in chosen.values():
        q.requires_grad_(True)
    blockwise = None
    if params.blockwise_epochs > 0:
        t0 = time.perf_counter()
        with ctx.timed("blockwise"):
            ppl0 = _ppl(rm.model, held)
            fits = blockwise_stage(rm, rec, chosen, teacher_graph, windows, params, ctx)
        blockwise = _blockwise_facts(fits, ppl0, windows, params, time.perf_counter() - t0)
    with ctx.timed("teacher"):
        teacher_ppl, targets = engine_teacher(teacher_graph, windows, held, schedule, params, ctx)
    checkpointed = params.checkpointing and _checkpointing(rm.model, True)
    t0 = time.perf_counter()
    with ctx.timed("distill"):
        losses, curve = distill(rm.model, windows, targets, list(chosen.values()), params,
                                schedule=schedule, evaluate=lambda: _ppl(rm.model, held),
                                progress=ctx.progress, status=ctx.status)
    if checkpointed:
        _checkpointing(rm.model, False)
    facts = _facts(rec, who, windows, held, losses, curve, teacher_ppl, params, count_parameters(chosen.values()),
                   count_parameters(rm.model.parameters()), time.perf_counter() - t0)
    if blockwise is not None:
        facts["blockwise"] = blockwise
    trained = {n: q.detach().cpu().float() for n, q in chosen.items()}
    out = write_form(graph, rec, trained, ctx)
    summary = dict(rec.info)
    summary["distill"] = {k: v for k, v in facts.items() if k != "teacher"}
    out.extra_files["recursion.json"] = json.dumps(summary, indent=2) + "\n"
    out.results.append({"title": "Distillation (retrain.distill)", "teacher_perplexity": teacher_ppl,
                        "perplexity_before": curve[0][1], "perplexity_after": curve[-1][1],
                        "steps": params.steps, "tokens": facts["tokens"]})
    if "recursive-transformer" not in out.tags:
        out.tags.append("recursive-transformer")
    ctx.report(distill=facts, card_notes=[_card_note(facts)])
    return out


def _blockwise_facts(fits: list[SlotFit], ppl0: float, windows: torch.Tensor, p: Params, secs: float) -> dict:
    return {"epochs": p.blockwise_epochs, "windows": min(p.blockwise_windows, int(windows.shape[0])),
            "lr": p.blockwise_lr, "steps_per_block": fits[0].steps if fits else 0, "perplexity_before": ppl0,
            "seconds": round(secs, 1),
            "blocks": [{"slot": f.slot, "layers": f.layers, "fit_error_before": f.error_before,
                        "fit_error_after": f.error_after} for f in fits]}


def _card_note(f: dict[str, Any]) -> str:
    points = ", ".join(f"{s}: {_fmt(v)}" for s, v in f["curve"])
    stage = ""
    if "blockwise" in f:
        b = f["blockwise"]
        stage = (f"A block-wise stage first fitted each shared block to the teacher's layers ({b['epochs']:g} "
                 f"pass(es) over {b['windows']} windows): held-out perplexity {_fmt(b['perplexity_before'])} -> "
                 f"{_fmt(f['curve'][0][1])}. ")
    return (f"{stage}Uptrained by distillation from the original model ({f['steps']} steps, {f['tokens']:,} tokens, "
            f"KL at temperature {f['temperature']}): held-out perplexity by step {points} "
            f"(teacher {_fmt(f['teacher_perplexity'])}).")


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)
