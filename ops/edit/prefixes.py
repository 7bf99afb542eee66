"""Prefixes of an edit (ALGORITHMS.md §4.2): short texts sampled from the model itself (top-k 5, seeded) and put
before each prompt (``"<sample>. <prompt>"``), so that the key and the value hold whatever comes before it."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from surgeon.errors import SurgeonError

#: EMMET/MEMIT prefix seeds (§4.2); ROME seeds its prefixes from the BOS token instead (``kmeng01/rome``)
SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def seed_ids(tok: Any, seeds: str, n: int) -> list[list[int]]:
    """Token ids each sampled prefix starts from: the BOS token (``seeds="bos"``, ROME's ``"<|endoftext|>"``;
    EOS or the first special token where a tokenizer has no BOS) or the words of :data:`SEED_WORDS` in turn
    (``"words"``, MEMIT/EMMET; with the special tokens the tokenizer adds, as the reference's batch has them)."""
    if seeds == "bos":
        bos = next((v for v in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None))
                    if isinstance(v, int)), None)
        if bos is None:
            raise SurgeonError("prefix seeds 'bos': the tokenizer has neither a BOS nor an EOS token "
                               "(use prefix_seeds: words)")
        return [[bos] for _ in range(n)]
    if seeds != "words":
        raise SurgeonError(f"prefix seeds {seeds!r}: expected 'bos' or 'words'")
    return [list(tok(SEED_WORDS[i % len(SEED_WORDS)])["input_ids"]) for i in range(n)]


def sample_prefixes(score: Any, tok: Any, lengths: Sequence[int], *, seed: int, top_k: int = 5,
                    seeds: str = "words") -> list[str]:
    """One sampled text per entry of ``lengths``, each ending in ``". "`` so that a prompt can follow.
    Deterministic for a fixed seed. A length counts the seed's tokens too, as the reference's
    ``generate_fast(max_out_len=length)`` does: ROME's 5 and 10 from BOS draw 4 and 9 new tokens, EMMET's 10
    from a one-token word draws 9. ``seeds``: see :func:`seed_ids`.

    All texts are drawn together, one token per step, with the same generator draws either way: when every seed
    has the same length and ``score`` has a ``decode`` (:class:`.metrics.EngineScorer`: the engine's KV-cached
    :class:`surgeon.engine.Decoder`), one cached decode; otherwise max(new tokens) full passes, each
    ``score(rows, positions)`` giving every row's logits at its last token."""
    if not lengths:
        return []
    gen = torch.Generator().manual_seed(seed)
    starts = seed_ids(tok, seeds, len(lengths))
    n_new = [max(length - len(st), 1) for st, length in zip(starts, lengths)]
    choose = generate_fast_draw(top_k, gen)
    decode = getattr(score, "decode", None)
    if decode is not None and len({len(st) for st in starts}) == 1:
        drawn = decode(torch.tensor(starts, dtype=torch.long), max(n_new), choose)
        rows = [list(st) + [int(t) for t in row] for st, row in zip(starts, drawn.tolist())]
    else:
        rows = [list(st) for st in starts]
        for _ in range(max(n_new)):
            logits = torch.stack([lg[0] for lg in score(rows, [[len(r) - 1] for r in rows])])
            for r, t in zip(rows, choose(logits)[:, 0].tolist()):
                r.append(int(t))
    out_texts = []
    for st, row, n in zip(starts, rows, n_new):
        text = tok.decode(row[:len(st) + n], skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
        out_texts.append(text + ". ")
    return out_texts


def generate_fast_draw(top_k: int, gen: torch.Generator):
    """The reference's prefix sampler for one step: a draw from the softmax of each row's ``top_k`` largest fp32
    logits (``generate_fast(top_k=5)``); returns the chosen ids ``[b, 1]``."""

    def choose(logits: torch.Tensor) -> torch.Tensor:
        top = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
        return top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=gen))

    return choose


def prefix_lengths(kind: str, n: int) -> list[int]:
    """Sampled lengths (seed tokens included). ROME: half of 5 tokens, half of 10 (20 by default); EMMET/MEMIT:
    all of 10 (5 by default)."""
    if kind == "rome":
        return [5] * (n // 2) + [10] * (n - n // 2)
    return [10] * n
