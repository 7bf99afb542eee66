"""Eager attention for grouped-query models without the key/value copies.

transformers' eager attention repeats each key/value head once per query head of its group (``repeat_kv``)
before the product; :func:`grouped_eager_attention` multiplies each key/value head with its group of query heads
directly. Same result, no ``[B, heads, T, d]`` copies. The signature is transformers' ``AttentionInterface`` one;
:func:`surgeon.arch.attention_implementation` registers it under :data:`GROUPED_ATTENTION` where a family's own
eager attention is the plain one.
"""
from __future__ import annotations

import torch

GROUPED_ATTENTION = "surgeon_grouped_eager"


def grouped_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(QKᵀ·scaling + mask)·V with query head ``i·g + j`` reading key/value head ``i`` (``g`` query heads
    per key/value head). Returns (output ``[B, T, heads, d]``, probabilities ``[B, heads, T, S]``)."""
    b, h, tq, d = query.shape
    kv_heads = key.shape[1]
    g = h // kv_heads
    q = query.reshape(b, kv_heads, g * tq, d)  # query head i·g + j uses key/value head i
    scores = (q @ key.transpose(-1, -2)).view(b, kv_heads, g, tq, -1) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores + mask[:, :, None] if mask.dtype != torch.bool else \
            scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = (probs.view(b, kv_heads, g * tq, -1) @ value).view(b, h, tq, d)
    return out.transpose(1, 2).contiguous(), probs.view(b, h, tq, -1)
