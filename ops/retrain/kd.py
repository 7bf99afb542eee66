"""Knowledge-distillation math for ``retrain.distill`` (no model wiring here).

Loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", Eq. 2 with the usual τ² factor): for
every token position, the forward KL from the teacher's to the student's tempered next-token distribution,

    L = τ² · mean_positions  Σ_v p_T(v) · (log p_T(v) − log p_S(v)),   p = softmax(z / τ),

i.e. ``τ² · F.kl_div(log p_S, p_T, reduction="batchmean")`` over the flattened positions. With ``top_k`` the
teacher keeps only its k largest logits per position, renormalised over them (p̂_T), and the student's full
log-softmax is read at those k tokens: L = τ² · mean Σ_{v∈topk} p̂_T(v) (log p̂_T(v) − log p_S(v)); k = vocab
is the exact loss. Top-k targets are small ([n, L, k] values + indices), so they are computed once for all
windows (on the model engine, :func:`surgeon.engine.outputs.top_logits`) and the teacher freed before training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TopK:
    """The teacher's k largest logits per position (``values`` fp32, ``indices`` int64), ``[..., k]``."""

    values: torch.Tensor
    indices: torch.Tensor

    def __getitem__(self, idx) -> TopK:
        return TopK(self.values[idx], self.indices[idx])


Targets = torch.Tensor | TopK  # full teacher logits [..., V] or their top-k


def kd_loss(student_logits: torch.Tensor, teacher: Targets, temperature: float = 1.0) -> torch.Tensor:
    """τ²·KL(p_T ‖ p_S) averaged over positions (all leading dims); fp32 math whatever the logits' dtype."""
    t = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    if isinstance(teacher, TopK):
        log_pt = F.log_softmax(teacher.values.float() / t, dim=-1)
        log_ps = log_ps.gather(-1, teacher.indices.to(log_ps.device))
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits {list(teacher.shape)} vs student {list(student_logits.shape)}")
        log_pt = F.log_softmax(teacher.float() / t, dim=-1)
    per_position = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return per_position.mean() * (t * t)
