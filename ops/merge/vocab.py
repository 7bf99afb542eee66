"""Vocabularies of merged models: the check that they agree, and ``tokenizer_source: base | union | <model>``.

Merging embeddings row by row is only meaningful when row i is the same token in every input; two fine-tunes
that added different tokens (or reordered them) have equal shapes but different vocabularies, and a plain merge
mixes unrelated tokens silently (mergekit#425, #47). :func:`check_same_vocabulary` refuses that unless a
tokenizer source is given.

With a tokenizer source the output vocabulary is the base model's, a union of all inputs' (the base's tokens
first, then the others' new tokens, then added/special tokens, as mergekit 0.1.5 builds it) or a named model's.
Every input's embedding and LM-head rows are permuted into that vocabulary before merging; a token an input lacks
gets (mergekit's rule) the row of the only input that has it, else the base's row, else the mean of the rows of
the inputs that have it, else zeros. The merged model's ``vocab_size`` and tokenizer files follow.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch
    from surgeon.ops.merge.inputs import MergeInputs

    from surgeon.context import Context
    from surgeon.graph import Graph

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


# ---------------------------------------------------------------------------------------------------------
# reading vocabularies (no transformers import: tokenizer.json is plain JSON)


def read_vocab(g: Graph, ctx: Context, raw: bytes | None = None) -> dict[str, int] | None:
    """token -> id from the graph's ``tokenizer.json`` (model vocabulary + added tokens; ``raw``: its bytes, when
    already read), or None without one."""
    from surgeon.storage import decode_json

    src = g.side_files.get("tokenizer.json")
    if src is None:
        return None
    data = decode_json(raw if raw is not None else ctx.read(str(src), what="tokenizer.json"),
                       where=f"tokenizer.json: {src}")
    model = data.get("model", {})
    vocab = model.get("vocab")
    out: dict[str, int] = {}
    if isinstance(vocab, dict):
        out.update({str(k): int(v) for k, v in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out.update({str(p[0]): i for i, p in enumerate(vocab)})
    for t in data.get("added_tokens", []):
        out[str(t["content"])] = int(t["id"])
    return out


def _vocab_rows(vocab: dict[str, int], rows: Any) -> dict[str, int]:
    """The tokens whose ids are embedding rows (all of them when the config has no ``vocab_size``)."""
    return {t: i for t, i in vocab.items() if i < rows} if isinstance(rows, int) else vocab


def check_same_vocabulary(named: list[tuple[str, Graph]], ctx: Context, *, op: str) -> None:
    """Refuse inputs whose tokenizers map tokens to different ids (within the embedding rows). The first
    ``tokenizer.json`` is parsed (a malformed one is an error); one byte-equal to it, with the same
    ``vocab_size``, is not parsed again (fine-tunes of one base usually ship the same file; 0.1 s each)."""
    ref_name, ref_key, ref_vocab = None, None, None
    for name, g in named:
        src = g.side_files.get("tokenizer.json")
        if src is None:
            continue
        raw, rows = ctx.read(str(src), what="tokenizer.json"), g.config.get("vocab_size")
        if ref_key == (raw, rows):
            continue
        v = _vocab_rows(read_vocab(g, ctx, raw) or {}, rows)
        if ref_vocab is None:
            ref_name, ref_key, ref_vocab = name, (raw, rows), v
            continue
        if v != ref_vocab:
            diff = next((t for t in sorted(set(v) | set(ref_vocab)) if v.get(t) != ref_vocab.get(t)), "?")
            raise SurgeonError(
                f"{op}: the vocabularies of {ref_name!r} and {name!r} differ (token {diff!r} has id "
                f"{ref_vocab.get(diff)} in {ref_name!r}, {v.get(diff)} in {name!r}), so their embedding rows mean "
                "different tokens; pass tokenizer_source (base, union or a model) or --backbone-only")


# ---------------------------------------------------------------------------------------------------------
# building the output vocabulary (transformers tokenizers)


def _load_tokenizer(g: Graph, what: str):
    from transformers import AutoTokenizer

    if "tokenizer.json" not in g.side_files and "tokenizer_config.json" not in g.side_files:
        raise SurgeonError(f"tokenizer_source: {what!r} has no tokenizer files")
    folder = Path(g.side_files.get("tokenizer.json") or g.side_files["tokenizer_config.json"]).parent
    return AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def union_tokenizer(base_tok, toks: list[tuple[Any, int]]):
    """mergekit's union: the base tokenizer plus every other input's tokens (ids < its vocab_size), regular
    tokens first in input order (each input's tokens by id), then the added/special tokens."""
    out_vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for tok, rows in toks:
        decoder = tok.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        # by id: mergekit iterates get_vocab(), whose order comes from a Rust hash map and changes between runs
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= rows or t in added_contents:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in decoder.items():
            if i < rows:
                added.setdefault(info.content, info)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


@dataclass
class VocabPlan:
    """The output vocabulary and, per input, the old row of each new id (−1: missing) and the fill rule."""

    size: int
    rows: dict[str, list[int]]  # input name -> old row per new id
    fill: list[tuple[str, Any]]  # per new id: ("own", None) | ("donor", name) | ("base", name) | ("mean", names) | ("zero", None)
    tokenizer: Any


def plan_vocabulary(participants: list[tuple[str, Graph]], source: str, graphs: dict[str, Graph],
                    base_name: str | None) -> VocabPlan:
    toks = {n: _load_tokenizer(g, n) for n, g in participants}
    rows_of = {n: int(g.config.get("vocab_size") or len(toks[n])) for n, g in participants}
    first = base_name if base_name is not None else participants[0][0]
    if source == "base":
        out_tok = toks[first]
    elif source == "union":
        out_tok = union_tokenizer(toks[first], [(toks[n], rows_of[n]) for n, _ in participants])
    else:
        if source not in graphs:
            raise SurgeonError(f"tokenizer_source: {source!r} is not base, union or an input model")
        out_tok = toks.get(source) or _load_tokenizer(graphs[source], source)
    vocab = out_tok.get_vocab()
    size = len(vocab)
    rows: dict[str, list[int]] = {}
    for n, _ in participants:
        mv = toks[n].get_vocab()
        r = [-1] * size
        for t, new in vocab.items():
            old = mv.get(t)
            if old is not None and old < rows_of[n] and new < size:
                r[new] = old
        rows[n] = r
    names = [n for n, _ in participants]
    fill: list[tuple[str, Any]] = []
    for i in range(size):
        have = [n for n in names if rows[n][i] >= 0]
        if len(have) == len(names):
            fill.append(("own", None))
        elif len(have) == 1:
            fill.append(("donor", have[0]))
        elif not have:
            fill.append(("zero", None))
        elif base_name in names and rows[base_name][i] >= 0:
            fill.append(("base", base_name))
        else:
            fill.append(("mean", tuple(have)))
    return VocabPlan(size, rows, fill, out_tok)


def permute_rows(values: dict[str, torch.Tensor], plan: VocabPlan, who: str) -> torch.Tensor:
    """``who``'s vocabulary tensor (rows = tokens) in the output vocabulary; missing rows filled by the plan."""
    import torch

    src = values[who]
    out = torch.zeros((plan.size, *src.shape[1:]), dtype=src.dtype)
    r = torch.tensor(plan.rows[who])
    have = (r >= 0).nonzero().reshape(-1)
    out[have] = src[r[have]]
    for i in (r < 0).nonzero().reshape(-1).tolist():
        kind, arg = plan.fill[i]
        if kind in ("donor", "base"):
            out[i] = values[arg][plan.rows[arg][i]]
        elif kind == "mean":
            acc = torch.zeros(src.shape[1:], dtype=src.dtype)
            for n in arg:
                acc = acc + values[n][plan.rows[n][i]]
            out[i] = acc / len(arg)
    return out


def tokenizer_files(tok: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def apply_tokenizer_source(participants: list[tuple[str, Graph]], source: str, graphs: dict[str, Graph],
                           base_name: str | None, vocab_tensors: set[str],
                           ctx: Context) -> tuple[dict[str, Graph], dict[str, bytes]]:
    """Copies of the participants whose vocabulary tensors are lazily permuted into the output vocabulary, and
    the output tokenizer's files."""
    from surgeon.graph import Apply

    plan = plan_vocabulary(participants, source, graphs, base_name)
    names = [n for n, _ in participants]
    out: dict[str, Graph] = {}
    for who, g in participants:
        h = g.copy()
        for t in vocab_tensors:
            if t not in g:
                continue
            node = g[t]

            def fn(*vals, who=who):
                return permute_rows(dict(zip(names, vals)), plan, who)

            h.replace(t, Apply(fn, [gr[t] for _, gr in participants], label="vocab-permute",
                               shape=(plan.size, *node.shape[1:]), dtype=node.dtype))
        h.config["vocab_size"] = plan.size
        out[who] = h
    return out, tokenizer_files(plan.tokenizer)


def chat_template_of(g: Graph, ctx: Context) -> str | None:
    p = g.side_files.get("chat_template.jinja")
    if p is not None:
        return ctx.read_text(str(p), what="chat_template")
    p = g.side_files.get("tokenizer_config.json")
    if p is not None:
        ct = ctx.read_json(str(p), what="chat_template").get("chat_template")
        return ct if isinstance(ct, str) else None
    return None


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def resolve_chat_template(value: str, graphs: list[Graph], ctx: Context) -> str | None:
    """mergekit's chat_template: ``auto`` (the most common among the inputs), ``chatml``, or a Jinja template."""
    if value == "auto":
        found = [t for t in (chat_template_of(g, ctx) for g in graphs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value == "chatml":
        return CHATML
    if "{" not in value:
        raise SurgeonError(f"chat_template: {value!r} is not auto, chatml or a Jinja template")
    return value


# ---------------------------------------------------------------------------------------------------------
# the merge's inputs and output files


def align_vocabularies(inputs: MergeInputs, source: str, graphs: dict[str, Graph], ctx: Context) -> None:
    """Permute every input's vocabulary rows into the ``tokenizer_source`` vocabulary; the primary gets its files."""
    from surgeon.ops.merge.inputs import embedding_names

    participants = ([(inputs.base_name, inputs.base)] if inputs.base is not None else []) + \
        list(zip(inputs.names, inputs.graphs))
    vocab_tensors = set()
    for _, g in participants:
        vocab_tensors |= embedding_names(g, ctx)
    aligned, files = apply_tokenizer_source(participants, source, graphs, inputs.base_name, vocab_tensors, ctx)
    was_base = inputs.primary is inputs.base
    if inputs.base is not None:
        inputs.base = aligned[inputs.base_name]
    inputs.graphs = [aligned[n] for n in inputs.names]
    inputs.primary = inputs.base if was_base else inputs.graphs[0]  # fresh copies: safe to change
    for rel in TOKENIZER_FILES:
        inputs.primary.side_files.pop(rel, None)
    for rel, data in files.items():
        ctx.attach(inputs.primary, rel, data)
    inputs.vocab_aligned = True


def set_chat_template(inputs: MergeInputs, value: str, ctx: Context) -> None:
    """Give the primary (the output's files) the ``chat_template`` chosen among the inputs, and drop the
    template from its ``tokenizer_config.json``."""
    template = resolve_chat_template(value, ([inputs.base] if inputs.base is not None else []) + inputs.graphs, ctx)
    if template is None:
        return
    # the primary's copy replaces it everywhere (ops may pick the primary again from base/graphs)
    prim = inputs.primary.copy()
    if inputs.primary is inputs.base:
        inputs.base = prim
    inputs.graphs = [prim if g is inputs.primary else g for g in inputs.graphs]
    inputs.primary = prim
    ctx.attach(prim, "chat_template.jinja", template)
    prim.side_files.pop("chat_template.jinja", None)
    cfg_bytes = prim.extra_files.get("tokenizer_config.json")
    src = prim.side_files.get("tokenizer_config.json")
    if cfg_bytes is None and src is not None:
        cfg_bytes = ctx.read(str(src), what="chat_template")
    if cfg_bytes is not None:
        cfg = json.loads(cfg_bytes)
        if "chat_template" in cfg:
            cfg.pop("chat_template")
            prim.side_files.pop("tokenizer_config.json", None)
            ctx.attach(prim, "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
