"""The block-wise stage of ``retrain.distill``: each shared block fitted to the teacher's blocks, one at a time.

Before the end-to-end KL steps, every slot ``k`` of a tied model (the shared block, the LoRA factors and norms of
the layers ``i`` that use it) is trained on its own to reproduce the teacher's layers from the teacher's inputs:

    min  Σ_{i ∈ layers(k)}  ‖f_i(X_i) − Y_i‖² / ‖Y_i − X_i‖²

with ``X_i``/``Y_i`` the teacher's hidden states entering/leaving layer ``i`` (:class:`surgeon.engine.outputs.
BlockStates`) and ``f_i`` the student's layer ``i`` (the slot's weights plus layer ``i``'s LoRA, Bae et al. Eq. 3).
The denominator, the energy of the teacher layer's residual update, weighs every layer alike whatever the scale of
the residual stream at its depth. This is block-wise (layer-local) distillation: each step costs one or two blocks
instead of the whole model and its head, so the stage sees many more tokens than the end-to-end steps for the same
time; the end-to-end KL then corrects the error that compounds over the depth.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgeon.engine.core import block_output
from surgeon.engine.outputs import BlockStates

#: micro-batches the fit error of a slot is measured on, before and after its steps
ERROR_BATCHES = 8


def slot_layers(layer_to_slot: Sequence[int]) -> dict[int, list[int]]:
    """The unrolled layers of each slot, in slot order (``[0, 1, 0, 1]`` -> ``{0: [0, 2], 1: [1, 3]}``)."""
    out: dict[int, list[int]] = {}
    for i, k in enumerate(layer_to_slot):
        out.setdefault(int(k), []).append(i)
    return dict(sorted(out.items()))


def update_energy(states: BlockStates, layer: int, device: torch.device) -> float:
    """Mean over all entries of ``(Y_i − X_i)²``: the teacher layer's residual update (the loss's scale)."""
    total, count = 0.0, 0
    for j in range(states.n_batches):
        d = states.get(layer + 1, j, device) - states.get(layer, j, device)
        total += float(d.double().pow(2).sum())
        count += d.numel()
    return total / max(count, 1)


def slot_loss(layers: dict[int, nn.Module], states: BlockStates, j: int, energy: dict[int, float],
              device: torch.device) -> torch.Tensor:
    """The slot's objective on micro-batch ``j``: Σ_i mean (f_i(X_i) − Y_i)² / energy_i."""
    kwargs = states.batches[j].kwargs
    total = torch.zeros((), device=device)
    for i, layer in layers.items():
        y = block_output(layer, states.get(i, j, device), kwargs)
        total = total + (y - states.get(i + 1, j, device)).pow(2).mean() / energy[i]
    return total


def fit_error(layers: dict[int, nn.Module], states: BlockStates, energy: dict[int, float], device: torch.device,
              batches: Sequence[int]) -> float:
    """Mean of :func:`slot_loss` over ``batches`` (no gradient), per layer of the slot."""
    with torch.no_grad():
        got = [float(slot_loss(layers, states, j, energy, device)) for j in batches]
    return sum(got) / max(len(got), 1) / max(len(layers), 1)


@dataclass
class SlotFit:
    slot: int
    layers: list[int]
    steps: int
    error_before: float
    error_after: float


def fit_slot(slot: int, layers: dict[int, nn.Module], params: list[nn.Parameter], states: BlockStates, *,
             steps: int, make_optimizer: Callable, seed: int, device: torch.device) -> SlotFit:
    """``steps`` AdamW steps on the slot's objective, one micro-batch each (shuffled passes over the micro-
    batches); ``params`` are the slot's trainable tensors (shared weights, its layers' LoRA factors and norms)."""
    energy = {i: update_energy(states, i, device) for i in layers}
    probe = list(range(min(ERROR_BATCHES, states.n_batches)))
    before = fit_error(layers, states, energy, device, probe)
    opt, sched = make_optimizer(params, steps)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for layer in layers.values():
        layer.train()
    for _ in range(steps):
        if not order:
            order = torch.randperm(states.n_batches, generator=g).tolist()
        loss = slot_loss(layers, states, order.pop(), energy, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for layer in layers.values():
        layer.eval()
    after = fit_error(layers, states, energy, device, probe)
    return SlotFit(slot, sorted(layers), steps, round(before, 6), round(after, 6))
