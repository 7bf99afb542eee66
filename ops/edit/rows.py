"""Prompt rows of an edit: tokenised prompts with the subject's last token located (from the tokenizer's
character offsets), and the rows of the value optimisation (prompt + target tokens, one KL row per request).
Rows are never padded: the model engine batches rows of equal length.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from surgeon.errors import SurgeonError

from .requests import Request


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
