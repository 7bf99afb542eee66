"""Keys k and values v* of an edit (ALGORITHMS.md §4.2): the objective and its Adam loop.

- **Prefixes** (:mod:`.prefixes`): short texts sampled from the model, put before the prompt.
- **Key**: input of the edited down-projection at the subject's last token, averaged over the plain prompt and
  the prefixed prompts: uniformly for ROME (``kmeng01/rome`` ``compute_u``: 1/21 each), per template type for
  MEMIT/EMMET (``compute_ks``: ``k = ½(k_plain + mean_j k_j)``). The same averaged k is used in the direction,
  the residual and the denominator of the update (the consistent r-ROME form).
- **Value**: δ added to the down-projection's output at the subject's last token of every prompt (for one
  layer this equals adding it to the residual stream after that layer), optimised with Adam to make the
  target likely: loss = mean NLL(target) + kl_factor·KL(P_δ ‖ P_0) on ``"{subject} is a"`` + wd·‖δ‖/‖r‖²;
  ‖δ‖ ≤ clamp·‖r‖ after every step; stop when the loss is below ``stop_loss``. v* = v₀ + δ. The reference
  norm r is the MLP output v₀ for ROME (``rome/compute_v.py``) and the layer output h_L (the residual stream)
  for MEMIT/EMMET (``compute_z.py``), both at the plain prompt's subject token.

Several requests are optimised together (one δ row each, the loss a sum of per-request losses, per-request
early stopping: a converged request's rows leave the batch), which gives exactly the per-request result because
Adam is elementwise.

Layout: the objective's math is :func:`value_loss`, :func:`target_probability` and :func:`clamp_rows_`, the loop
:func:`_adam`; the rows are built in :mod:`.rows`; the forward passes run on the model engine
(:mod:`.engine_values`: blocks before the edited layer once, blocks from it on per step).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def average_keys(keys: torch.Tensor, uniform: bool) -> torch.Tensor:
    """[n, 1 + prefixes, d] keys per request and template -> [n, d]. ``uniform``: the mean over every template
    (ROME's ``compute_u``); otherwise the mean of the plain key and the prefixed keys' mean (MEMIT/EMMET's
    ``compute_ks``: one average per template type, then over types)."""
    if keys.shape[1] == 1 or uniform:
        return keys.mean(1)
    return 0.5 * (keys[:, 0] + keys[:, 1:].mean(1))


# -------------------------------------------------------------------------------------------------- values
@dataclass
class ValueSettings:
    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 0.05
    #: what clamp and weight decay are relative to: "mlp" (v₀, ROME) or "layer" (h_L, MEMIT/EMMET)
    norm_reference: str = "mlp"
    #: key average over templates: uniform (ROME) or per template type (MEMIT/EMMET), see :func:`average_keys`
    uniform_keys: bool = False


@dataclass
class ValueResult:
    values: torch.Tensor  # v* = v0 + δ, [d_out, n]
    initial: torch.Tensor  # v0, [d_out, n]
    losses: list[float] = field(default_factory=list)  # final loss per request
    target_prob: list[float] = field(default_factory=list)  # mean P(target token) on the prompts, at the end
    steps: list[int] = field(default_factory=list)  # steps taken per request
    keys: torch.Tensor | None = None  # the averaged keys, [d_k, n], from the same forward pass as v0



# ------------------------------------------------------------------------------------- the v* objective (math)
def value_loss(logp: torch.Tensor, n_targets: int, target_tokens: torch.Tensor, target_rows: torch.Tensor,
               per_prompt_tokens: torch.Tensor, n_ctx: int, live: torch.Tensor, kl_init: torch.Tensor,
               delta: torch.Tensor, ref_sq: torch.Tensor, settings: ValueSettings
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per live request: mean NLL(target) over its prompts + kl_factor·KL(P_δ ‖ P_0) on ``"{subject} is a"`` +
    weight_decay·‖δ‖/‖r‖² (ALGORITHMS.md §4.2). ``logp``: log-probabilities at the ``n_targets`` target positions,
    then one KL position per live request. Returns (loss per live request, log P of each target token)."""
    n = live.shape[0]
    tok_lp = logp[:n_targets].gather(1, target_tokens[:, None])[:, 0]
    # mean NLL per prompt, then mean over each request's prompts (rows of dead requests are 0)
    nll_prompt = -torch.zeros(n * n_ctx, device=logp.device).index_add(0, target_rows, tok_lp) / per_prompt_tokens
    nll = nll_prompt.reshape(n, n_ctx).mean(1)[live]
    kl_lp = logp[n_targets:]
    kl = (kl_lp.exp() * (kl_lp - kl_init[live])).sum(-1)
    wd = (settings.weight_decay * delta.norm(dim=1) / ref_sq)[live]
    return nll + settings.kl_factor * kl + wd, tok_lp


def target_probability(tok_lp: torch.Tensor, target_rows: torch.Tensor, per_prompt_tokens: torch.Tensor,
                       n_ctx: int) -> torch.Tensor:
    """Mean P(target token) over each request's prompts, [n]."""
    n_rewrite = per_prompt_tokens.shape[0]
    p_tok = torch.zeros(n_rewrite, device=tok_lp.device).index_add(0, target_rows, tok_lp.exp())
    return (p_tok / per_prompt_tokens).reshape(n_rewrite // n_ctx, n_ctx).mean(1)


def clamp_rows_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """‖δ_i‖ ≤ max_norm_i, in place (ROME's projection after each step)."""
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
    delta.mul_(scale[:, None])


# ---------------------------------------------------------------------------------------------- wiring
@dataclass
class _Targets:
    """Where the loss reads the logits: target tokens (row, suffix position, id) and each request's KL row."""

    owner: torch.Tensor  # [R] request of each row
    row: torch.Tensor  # [T] row of each target token
    pos: torch.Tensor  # [T] its position in the row
    tok: torch.Tensor  # [T] its id
    kl_rows: torch.Tensor  # [n]
    per_prompt_tokens: torch.Tensor  # [n·n_ctx] target tokens per rewrite prompt
    n_ctx: int


def _adam(run: Any, logits: torch.Tensor, t: torch.Tensor, kl_init: torch.Tensor, ref: torch.Tensor,
          settings: ValueSettings, status: Callable[[str], None] | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise δ (created by the capture pass, whose ``logits`` are step 1) with per-request early stopping.
    Returns (losses, target probabilities, steps taken), per request."""
    tg, delta = run.targets, run.hooks.state["delta"]
    n, device = delta.shape[0], delta.device
    opt = torch.optim.Adam([delta], lr=settings.lr)
    max_norm = settings.clamp * ref.norm(dim=1)
    ref_sq = ref.norm(dim=1) ** 2
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps_taken = torch.zeros(n, dtype=torch.long)
    losses, probs = torch.zeros(n, device=device), torch.zeros(n, device=device)
    for it in range(settings.steps):
        live = ~done
        if it:
            logits, t = run.logits(live)
        loss, tok_lp = value_loss(logits.log_softmax(-1), len(t), tg.tok[t], tg.row[t], tg.per_prompt_tokens,
                                  tg.n_ctx, live, kl_init, delta, ref_sq, settings)
        with torch.no_grad():
            losses[live] = loss.detach()
            probs[live] = target_probability(tok_lp.detach(), tg.row[t], tg.per_prompt_tokens, tg.n_ctx)[live]
            converged = loss.detach() < settings.stop_loss
            done[live] = converged
        if status is not None:
            status(f"step {it + 1}/{settings.steps} loss {float(loss.detach().mean()):.3f} "
                   f"({int(live.sum())} of {n} requests)")
        if bool(done.all()) or it == settings.steps - 1:
            break
        keep = delta.detach()[done].clone()
        opt.zero_grad()
        loss[~converged].sum().backward()
        opt.step()
        with torch.no_grad():
            clamp_rows_(delta, max_norm)
            delta[done] = keep
        steps_taken[(~done).cpu()] += 1
    return losses, probs, steps_taken


