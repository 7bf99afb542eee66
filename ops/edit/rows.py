"""Prompt rows of an edit: tokenised prompts with the subject's last token located, padded batches, and the
rows of the value optimisation cut at that token (context before it, suffix from it on).

Token positions are counted from the start, so the subject index never depends on the padding side; the
subject's last token is found from the tokenizer's character offsets.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgeon.errors import SurgeonError

from .requests import Request

#: tokens per forward pass when batching rows (bounds activation memory)
TOKENS_PER_BATCH = 4096


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    lookup: int  # position of the subject's last token


# ---------------------------------------------------------------------------------------------- tokenization
def encode_subject(tok: Any, text: str, subject_end: int) -> Encoded:
    """Token ids of ``text`` (special tokens as the tokenizer adds them) and the index of the token holding
    character ``subject_end - 1``."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = [(i, s, e) for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s]
        inside = [i for i, s, _e in spans if s < subject_end]
        if not inside:
            raise SurgeonError(f"cannot find the subject's tokens in {text!r}")
        return Encoded(ids, inside[-1])
    ids = list(tok(text)["input_ids"])
    head = list(tok(text[:subject_end])["input_ids"])
    return Encoded(ids, len(head) - 1)


def target_ids(tok: Any, prompt: str, target: str) -> list[int]:
    """ids(prompt + target) minus ids(prompt); falls back to encoding the target alone when the prompt's
    tokens are not a prefix (then without special tokens)."""
    p = list(tok(prompt)["input_ids"])
    f = list(tok(prompt + target)["input_ids"])
    if len(f) > len(p) and f[: len(p)] == p:
        return f[len(p):]
    out = list(tok(target, add_special_tokens=False)["input_ids"])
    if not out:
        raise SurgeonError(f"target {target!r} encodes to no tokens")
    return out


def subject_span(request: Request, prefix: str = "") -> tuple[str, int]:
    """(text, character end of the subject) for ``prefix + prompt``."""
    template = request.template
    start = template.index("{}")
    text = prefix + request.text
    return text, len(prefix) + start + len(request.subject)



def pad_rows(rows: Sequence[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and attention mask (every row ends at the same column), on the CPU."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0 too)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def pad_id_of(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0


def chunks(n_rows: int, width: int, budget: int = TOKENS_PER_BATCH) -> list[range]:
    step = max(1, budget // max(width, 1))
    return [range(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


@dataclass
class Rows:
    ids: list[list[int]]
    lookup: list[int]
    owner: list[int]
    kl_rows: list[int]  # one row per request
    tgt_row: list[int]  # flat list of (row, position, token id) for target tokens
    tgt_pos: list[int]
    tgt_tok: list[int]
    n_rewrite_rows_per_request: int


def build_rows(tok: Any, requests: Sequence[Request], prefixes: Sequence[str]) -> Rows:
    ids, lookup, owner = [], [], []
    tgt_row, tgt_pos, tgt_tok = [], [], []
    n_ctx = 1 + len(prefixes)
    for i, r in enumerate(requests):
        tids = target_ids(tok, r.text, r.target)
        for p in ("", *prefixes):
            e = encode_subject(tok, *subject_span(r, p))
            row = len(ids)
            ids.append(e.ids + tids[:-1])
            lookup.append(e.lookup)
            owner.append(i)
            for j, t in enumerate(tids):
                tgt_row.append(row)
                tgt_pos.append(len(e.ids) - 1 + j)
                tgt_tok.append(t)
    kl_rows = []
    for i, r in enumerate(requests):
        text = f"{r.subject} is a"
        e = encode_subject(tok, text, len(r.subject))
        kl_rows.append(len(ids))
        ids.append(e.ids[: e.lookup + 1])  # the KL distribution is read at the subject's last token (ROME)
        lookup.append(e.lookup)
        owner.append(i)
    return Rows(ids, lookup, owner, kl_rows, tgt_row, tgt_pos, tgt_tok, n_ctx)


@dataclass
class Split:
    """Rows cut at the subject's last token. Nothing before it depends on δ, so its keys and values are computed
    once (the context, left-padded to ``P`` columns); each step runs only the suffix (right-padded to ``S``),
    which starts at the δ position for every row."""

    context_ids: torch.Tensor  # [R, P]
    context_mask: torch.Tensor  # [R, P]
    suffix_ids: torch.Tensor  # [R, S]
    suffix_mask: torch.Tensor  # [R, S]
    suffix_pos: torch.Tensor  # [R, S] absolute positions (lookup + j)


def split_rows(ids: Sequence[list[int]], lookup: Sequence[int], pad_id: int, device: str) -> Split:
    """Cut each row at its lookup index: context = ids[:lookup] (left-padded), suffix = ids[lookup:]."""
    cid, cmask = left_pad([r[:k] for r, k in zip(ids, lookup)], pad_id)
    sid, smask = pad_rows([r[k:] for r, k in zip(ids, lookup)], pad_id, device)
    spos = torch.tensor(lookup, device=device)[:, None] + torch.arange(sid.shape[1], device=device)
    return Split(cid.to(device), cmask.to(device), sid, smask, spos)
