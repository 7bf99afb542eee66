"""Keys k and values v* of an edit (ALGORITHMS.md §4.2), from forward passes of a transformers causal LM.

- **Prefixes**: short texts sampled from the model itself (top-k 5, seeded), so that the key and value hold
  whatever comes before the prompt. ``"<sample>. <prompt>"``.
- **Key**: input of the edited down-projection at the subject's last token, ``k = ½(k_plain + mean_j k_j)``
  over the plain prompt and the prefixed prompts. The same averaged k is used in the direction, the residual and
  the denominator of the update (the consistent r-ROME form).
- **Value**: δ added to the down-projection's output at the subject's last token of every prompt (for one
  layer this equals adding it to the residual stream after that layer), optimised with Adam to make the
  target likely: loss = mean NLL(target) + kl_factor·KL(P_δ ‖ P_0) on ``"{subject} is a"`` + wd·‖δ‖/‖v₀‖²;
  ‖δ‖ ≤ clamp·‖v₀‖ after every step; stop when the loss is below ``stop_loss``. v* = v₀ + δ.

Several requests are optimised together (one δ row each, the loss a sum of per-request losses, per-request
early stopping), which gives exactly the per-request result because Adam is elementwise, at a fraction of the
time on CPU. Token positions are counted from the start with right padding, so the subject index never depends
on the padding side; the subject's last token is found from the tokenizer's character offsets.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from surgeon.errors import SurgeonError

from .requests import Request

#: EMMET/MEMIT prefix seeds (§4.2)
SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
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


# ------------------------------------------------------------------------------------------------ plumbing
@contextmanager
def frozen(model: torch.nn.Module):
    """No parameter gradients while optimising δ; restores the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def pad_rows(rows: Sequence[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0


def chunks(n_rows: int, width: int, budget: int = TOKENS_PER_BATCH) -> list[range]:
    step = max(1, budget // max(width, 1))
    return [range(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _StopForward(Exception):
    """Raised by a hook once the edited layer has been reached (nothing later is needed)."""


def capture_inputs(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
    """Input of ``module`` for a batch ([B, T, d_k]); the forward pass stops at ``module``."""
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise SurgeonError("internal: the edited module was not called during the forward pass")
    return got[0]


def final_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Logits at (row, position) pairs only: the head is applied to the gathered hidden states, not to every
    position of every row (a 49k vocabulary × all positions would dominate time and memory)."""
    base = model.base_model
    head = model.get_output_embeddings()
    if base is model or head is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, positions].float()
    hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[rows, positions]).float()


# ------------------------------------------------------------------------------------------------ prefixes
def sample_prefixes(model: torch.nn.Module, tok: Any, lengths: Sequence[int], *, seed: int, device: str,
                    top_k: int = 5) -> list[str]:
    """One sampled text per entry of ``lengths`` (new tokens), seeds cycling through :data:`SEED_WORDS`,
    each ending in ``". "`` so that a prompt can follow. Deterministic for a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    groups: dict[tuple[str, int], int] = {}
    for i, n in enumerate(lengths):
        key = (SEED_WORDS[i % len(SEED_WORDS)], n)
        groups[key] = groups.get(key, 0) + 1
    out: list[str] = []
    for (word, n_new), count in groups.items():
        start = list(tok(word)["input_ids"])
        ids = torch.tensor([start] * count, dtype=torch.long)
        with torch.no_grad():
            for _ in range(n_new):
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -1].float().cpu()
                top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
        for row in ids.tolist():
            text = tok.decode(row, skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
            out.append(text + ". ")
    return out


def prefix_lengths(kind: str, n: int) -> list[int]:
    """ROME: half of 5 tokens, half of 10 (20 by default); EMMET/MEMIT: all of 10 (5 by default)."""
    if kind == "rome":
        return [5] * (n // 2) + [10] * (n - n // 2)
    return [10] * n


# ---------------------------------------------------------------------------------------------------- keys
def compute_keys(model: torch.nn.Module, tok: Any, module: torch.nn.Module, requests: Sequence[Request],
                 prefixes: Sequence[str], *, device: str) -> torch.Tensor:
    """Averaged keys, one column per request: [d_k, n] (fp32, CPU)."""
    encoded: list[Encoded] = []
    for r in requests:
        for p in ("", *prefixes):
            encoded.append(encode_subject(tok, *subject_span(r, p)))
    width = max(len(e.ids) for e in encoded)
    found: list[torch.Tensor] = []
    for part in chunks(len(encoded), width):
        rows = [encoded[i] for i in part]
        ids, mask = pad_rows([e.ids for e in rows], pad_id_of(tok), device)
        x = capture_inputs(model, module, ids, mask)
        found.append(x[torch.arange(len(rows), device=x.device), torch.tensor([e.lookup for e in rows])].float().cpu())
    keys = torch.cat(found).reshape(len(requests), 1 + len(prefixes), -1)
    if prefixes:
        keys = 0.5 * (keys[:, 0] + keys[:, 1:].mean(1))
    else:
        keys = keys[:, 0]
    return keys.T.contiguous()


# -------------------------------------------------------------------------------------------------- values
@dataclass
class ValueSettings:
    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 0.05


@dataclass
class ValueResult:
    values: torch.Tensor  # v* = v0 + δ, [d_out, n]
    initial: torch.Tensor  # v0, [d_out, n]
    losses: list[float] = field(default_factory=list)  # final loss per request
    target_prob: list[float] = field(default_factory=list)  # mean P(target token) on the prompts, at the end
    steps: list[int] = field(default_factory=list)  # steps taken per request


@dataclass
class _Rows:
    ids: list[list[int]]
    lookup: list[int]
    owner: list[int]
    kl_rows: list[int]  # one row per request
    tgt_row: list[int]  # flat list of (row, position, token id) for target tokens
    tgt_pos: list[int]
    tgt_tok: list[int]
    n_rewrite_rows_per_request: int


def _build_rows(tok: Any, requests: Sequence[Request], prefixes: Sequence[str]) -> _Rows:
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
        ids.append(e.ids)
        lookup.append(e.lookup)
        owner.append(i)
    return _Rows(ids, lookup, owner, kl_rows, tgt_row, tgt_pos, tgt_tok, n_ctx)


def optimise_values(model: torch.nn.Module, tok: Any, module: torch.nn.Module, requests: Sequence[Request],
                    prefixes: Sequence[str], settings: ValueSettings, *, device: str,
                    status: Callable[[str], None] | None = None) -> ValueResult:
    """v* for each request (see module docstring). Deterministic: no sampling happens here."""
    rows = _build_rows(tok, requests, prefixes)
    n = len(requests)
    ids, mask = pad_rows(rows.ids, pad_id_of(tok), device)
    row_idx = torch.arange(len(rows.ids), device=device)
    look_idx = torch.tensor(rows.lookup, device=device)
    owner = torch.tensor(rows.owner, device=device)
    n_rewrite = n * rows.n_rewrite_rows_per_request
    tgt_row = torch.tensor(rows.tgt_row, device=device)
    tgt_pos = torch.tensor(rows.tgt_pos, device=device)
    tgt_tok = torch.tensor(rows.tgt_tok, device=device)
    kl_rows = torch.tensor(rows.kl_rows, device=device)
    kl_look = look_idx[kl_rows]
    # gather positions for one head call: targets first, then the KL positions
    sel_rows = torch.cat([tgt_row, kl_rows])
    sel_pos = torch.cat([tgt_pos, kl_look])
    n_tgt = len(rows.tgt_row)

    d_out = None
    captured: dict[str, torch.Tensor] = {}
    delta: torch.Tensor | None = None

    def add_delta(_m, _args, out):
        nonlocal d_out
        if "v0" not in captured:
            captured["v0"] = out[row_idx, look_idx].detach().float()
        if delta is None:
            return out
        add = delta[owner].to(out.dtype)
        return out.index_put((row_idx, look_idx), out[row_idx, look_idx] + add)

    handle = module.register_forward_hook(add_delta)
    try:
        with frozen(model):
            with torch.no_grad():
                logits = final_logits(model, ids, mask, sel_rows, sel_pos)
            kl_init = logits[n_tgt:].log_softmax(-1)
            v0_rows = captured["v0"]
            # v0 = module output at the plain prompt's subject token (first row of each request)
            first = torch.arange(n, device=device) * rows.n_rewrite_rows_per_request
            v0 = v0_rows[first]
            delta = torch.zeros_like(v0, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=settings.lr)
            max_norm = settings.clamp * v0.norm(dim=1)
            v0_sq = v0.norm(dim=1) ** 2
            done = torch.zeros(n, dtype=torch.bool, device=device)
            steps_taken = torch.zeros(n, dtype=torch.long)
            per_prompt_tokens = torch.zeros(n_rewrite, device=device).index_add_(
                0, tgt_row, torch.ones(n_tgt, device=device))
            losses = torch.zeros(n, device=device)
            probs = torch.zeros(n, device=device)
            for it in range(settings.steps):
                logits = final_logits(model, ids, mask, sel_rows, sel_pos)
                logp = logits.log_softmax(-1)
                tok_lp = logp[:n_tgt].gather(1, tgt_tok[:, None])[:, 0]
                # mean NLL per prompt, then mean over each request's prompts
                nll_prompt = -torch.zeros(n_rewrite, device=device).index_add(0, tgt_row, tok_lp) / per_prompt_tokens
                nll = nll_prompt.reshape(n, rows.n_rewrite_rows_per_request).mean(1)
                kl_lp = logp[n_tgt:]
                kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
                wd = settings.weight_decay * delta.norm(dim=1) / v0_sq
                loss = nll + settings.kl_factor * kl + wd
                with torch.no_grad():
                    live = ~done
                    losses[live] = loss.detach()[live]
                    p_tok = torch.zeros(n_rewrite, device=device).index_add(0, tgt_row, tok_lp.detach().exp())
                    probs[live] = (p_tok / per_prompt_tokens).reshape(n, -1).mean(1)[live]
                    done |= loss.detach() < settings.stop_loss
                if status is not None:
                    status(f"step {it + 1}/{settings.steps} loss {float(loss.detach().mean()):.3f}")
                if bool(done.all()) or it == settings.steps - 1:
                    break
                keep = delta.detach()[done].clone()
                opt.zero_grad()
                loss[~done].sum().backward()
                opt.step()
                with torch.no_grad():
                    norms = delta.norm(dim=1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
                    delta[done] = keep
                steps_taken[(~done).cpu()] += 1
    finally:
        handle.remove()
    d = delta.detach()
    return ValueResult((v0 + d).T.cpu(), v0.T.cpu(), losses.tolist(), probs.tolist(), steps_taken.tolist())


def optimise_values_chunked(model: torch.nn.Module, tok: Any, module: torch.nn.Module,
                            requests: Sequence[Request], prefixes: Sequence[str], settings: ValueSettings, *,
                            device: str, status: Callable[[str], None] | None = None,
                            rows_per_chunk: int | None = None) -> ValueResult:
    """:func:`optimise_values` over groups of requests (each request's optimisation is independent of the
    others, so grouping changes only float rounding).

    A group runs until its slowest request converges. On CPU, where time is proportional to rows, each request
    is its own group (``rows_per_chunk`` default 1) and stops at its own convergence: the demo's 4 EMMET
    requests needed 7, 15, 14 and 24 steps, 60 request-steps instead of 4 × 25. On CUDA, where a bigger batch
    costs little more, groups hold up to 96 rows.
    """
    if rows_per_chunk is None:
        rows_per_chunk = 96 if str(device).startswith("cuda") else 1
    per = max(1, rows_per_chunk // (2 + len(prefixes)))
    parts = [optimise_values(model, tok, module, requests[i:i + per], prefixes, settings, device=device,
                             status=status) for i in range(0, len(requests), per)]
    return ValueResult(torch.cat([p.values for p in parts], 1), torch.cat([p.initial for p in parts], 1),
                       [x for p in parts for x in p.losses], [x for p in parts for x in p.target_prob],
                       [x for p in parts for x in p.steps])
