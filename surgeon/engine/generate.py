"""Text generation on the model engine: incremental decoding with a KV cache, one decoder block at a time.

The prompts are prefilled, then one token per step is decoded; each pass embeds the new tokens with the
engine's skeleton up to block 0 (the family's own code makes the rotary embeddings, masks and position ids from
the cache's length), runs every block in order, then the final norm and the output embedding on the last
position, and a *chooser* turns the fp32 logits into the next tokens (greedy argmax, or a seeded draw). Every
block's attention appends its keys and values to one transformers cache object: the cache works per
``layer_idx``, so the blocks can be called one at a time.

When every block and the head fit the memory budget (``--max-memory``, else :data:`DEFAULT_RESIDENT_BUDGET`)
the blocks stay loaded for the whole run (one weight load: as fast as a whole module). Otherwise each step
loads, runs and frees one block at a time, and reads the embedding rows it needs and then the head (8192 rows
at a time) from the graph: memory is the larger of one block and the head in its stored dtype, plus the cache,
and every generated token reads every block (slow).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from surgeon.engine.core import VOCAB_CHUNK, _dtype_size, _final_norm, _mb, cache_keyword, first_block_inputs
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.engine.core import Block, Engine

#: bytes of blocks + head (compute dtype) kept loaded across decoding steps when no --max-memory is given
DEFAULT_RESIDENT_BUDGET = 6 << 30

#: ``choose(logits [b, V] fp32 on the CPU) -> next ids [b, 1]``
Chooser = Callable[[torch.Tensor], torch.Tensor]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax token of each row (the first on ties, as ``torch.argmax``)."""
    return logits.argmax(-1, keepdim=True)


def _find_cache(args: tuple, kwargs: dict[str, Any]) -> Any:
    from transformers.cache_utils import Cache

    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)


def _head_bias(eng: Engine) -> torch.Tensor | None:
    head = eng.skeleton.get_output_embeddings()
    if getattr(head, "bias", None) is None:
        return None
    bias_p = eng._pname_of(head, "bias", "bias", required=False)
    return eng.graph.value(eng.pnames[bias_p]) if bias_p in eng.pnames else None


def _mixed_window(config) -> int | None:
    """The sliding window of a model whose layers mix sliding and full attention (Gemma-2), else None."""
    types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    return int(window) if len(types) > 1 and isinstance(window, int) else None


class Decoder:
    """Greedy or sampled continuations of token prompts on ``engine`` (see the module docstring).

    Use as a context manager (or call :meth:`close`): resident blocks and the tables are freed on exit.
    ``log`` receives one line when the blocks do not fit and are streamed per step."""

    def __init__(self, engine: Engine, *, budget: int | None = None, log: Callable[[str], None] | None = None):
        self.engine = eng = engine
        eng._load_globals()
        self._emb_p = eng._embed_pname()
        self._emb_name = eng.pnames[self._emb_p]
        self._head_name = eng._graph_of(eng._head_pname())
        if self._head_name is None:
            raise SurgeonError(f"engine: no output embedding (lm_head) in this {eng.roles.family} model")
        head_shape = eng.graph[self._head_name].shape
        self.vocab = int(head_shape[0])  # rows of the output embedding (may exceed the tokenizer's vocabulary)
        head_bytes = math.prod(head_shape) * _dtype_size(eng.dtype)
        need = sum(eng.block_bytes) + head_bytes
        limit = budget if budget is not None else (eng.max_memory or DEFAULT_RESIDENT_BUDGET)
        self.resident = need <= limit
        if not self.resident and log is not None:
            log(f"generate: the {eng.roles.n_layers} blocks and the head need {_mb(need)} in "
                f"{str(eng.dtype).removeprefix('torch.')}, over the {_mb(limit)} budget: streaming one block at a "
                "time for every generated token (bounded memory, slow)")
        self._blocks: dict[int, Block] = {}
        weight = eng._read_unchecked(self._head_name)
        for v0 in range(0, weight.shape[0], VOCAB_CHUNK):
            eng._check(self._head_name, weight[v0:v0 + VOCAB_CHUNK])
        self._table: torch.Tensor | None = None  # input embedding, stored dtype (streamed: read per step)
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # streamed: read per step
        if self.resident:  # held; the head in the compute dtype: one matmul per step, as a module's lm_head
            self._table = weight if self._head_name == self._emb_name else eng._read_unchecked(self._emb_name)
            bias = _head_bias(eng)
            self._head = (weight.to(device=eng.device, dtype=eng.dtype),
                          None if bias is None else bias.to(device=eng.device, dtype=eng.dtype))
        del weight  # streamed: a mapped source tensor leaves the resident set until the head runs again
        self._norm = _final_norm(eng)
        from surgeon.arch import logit_transform

        self._transform = logit_transform(eng.config.to_dict())
        self._cache_kw = cache_keyword(eng.skeleton)

    # ---------------------------------------------------------------------------------------------- parts
    def _embed(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, tuple, dict[str, Any], Any]:
        """New tokens ``ids [b, t]`` up to block 0: its input, the other positional and keyword arguments the
        model hands its layers, and the cache (created by the model on the first step)."""
        eng = self.engine
        uniq = torch.unique(ids)
        table = self._table if self._table is not None else eng._read_unchecked(self._emb_name)
        with eng.compact_embedding(uniq, table):
            del table
            args, kwargs = first_block_inputs(eng.skeleton, eng.layer_paths[0], use_cache=True,
                                              input_ids=torch.searchsorted(uniq, ids).to(eng.device),
                                              **{self._cache_kw: cache})
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache = _find_cache(args[1:], kwargs)
        if cache is None:
            raise SurgeonError(f"engine: this {eng.roles.family} model passes its layers no KV cache; "
                               "cannot generate block by block")
        return hidden, tuple(args[1:]), kwargs, cache

    def _block(self, i: int) -> Block:
        if i in self._blocks:
            return self._blocks[i]
        block = self.engine.load_block(i)
        if self.resident:
            self._blocks[i] = block
        return block

    def _through_blocks(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        for i in range(self.engine.roles.n_layers):
            block = self._block(i)
            out = block.module(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if not self.resident:
                self.engine.unload_block(block)
        return hidden

    def logits(self, last: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[b, V]`` of last-block hidden rows ``[b, d]`` (final norm, head, logit transform)."""
        if self._head is None:  # streamed: read now (a map of the file: its pages leave with it), 8192 rows at a time
            return self.engine.logits(last, (self.engine._read_unchecked(self._head_name), _head_bias(self.engine)))
        h = self._norm(last) if self._norm is not None else last
        out = F.linear(h, *self._head).float()
        return self._transform(out) if self._transform is not None else out

    # ---------------------------------------------------------------------------------------------- public
    def decode(self, prompts: torch.Tensor, steps: int, choose: Chooser = greedy, *, eos: int | None = None,
               tick: Callable[[], Any] | None = None) -> torch.Tensor:
        """``[b, ≤ steps]`` tokens following ``prompts [b, L]`` (rows of equal length, no padding), chosen by
        ``choose`` from each step's fp32 logits on the CPU. With ``eos``, decoding stops once every row has
        produced it (a row's tokens after its first EOS are meaningless). ``tick()`` is called before each step."""
        if prompts.ndim != 2 or prompts.shape[1] < 1:
            raise SurgeonError(f"generate: expected prompts [batch, length >= 1], got {list(prompts.shape)}")
        window = _mixed_window(self.engine.config)
        if window is not None and prompts.shape[1] + steps > window:
            raise SurgeonError(f"generate: {prompts.shape[1]} prompt + {steps} new tokens exceed the sliding window "
                               f"({window}) of this model's mixed sliding/full attention layers; use fewer tokens")
        out: list[torch.Tensor] = []
        done = torch.zeros(prompts.shape[0], dtype=torch.bool)
        cur, cache = prompts, None
        try:
            with torch.no_grad():
                for _ in range(steps):
                    if tick is not None:
                        tick()
                    hidden, args, kwargs, cache = self._embed(cur, cache)
                    hidden = self._through_blocks(hidden, args, kwargs)
                    cur = choose(self.logits(hidden[:, -1]).cpu()).reshape(-1, 1).long()
                    out.append(cur)
                    if eos is not None:
                        done |= cur[:, 0] == eos
                        if bool(done.all()):
                            break
        finally:
            del cache
            self.engine._unload([self._emb_p])
        return torch.cat(out, 1) if out else prompts.new_zeros(prompts.shape[0], 0)

    def __enter__(self):  # returns self
        return self

    def close(self) -> None:
        """Put resident blocks back on ``meta`` and drop the tables."""
        for block in self._blocks.values():
            self.engine.unload_block(block)
        self._blocks.clear()
        self._table, self._head = None, None

    def __exit__(self, *exc) -> None:
        self.close()
