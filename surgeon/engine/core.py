"""The sequential model engine: every model-level op runs a model block by block through it.

(Longer than our ~450-line guide on purpose: :class:`Engine` and :class:`Block` share the skeleton's private
loading state; the pure parts already live apart in ``stats.py``, ``store.py`` and ``dist.py``.)

1. The model's module is built on the ``meta`` device from its config (no memory). The non-block tensors
   (norms, position tables) are loaded; the input embedding only for the rows the samples use.
2. The samples (token windows; equal-length runs are batched ``micro_batch`` at a time) are run up to the
   first decoder block, which captures what transformers hands its layers (hidden states, rotary embeddings,
   masks, position ids): the family's own code computes them, so any family transformers supports works.
3. For each block in order: its tensors are read from the graph (lazy, so earlier steps' changes are seen),
   cast to the compute dtype on the device, the op observes or changes it (:class:`Block`), its outputs over
   every sample become the next block's inputs, and its tensors go back to ``meta``.
4. The head (final norm + output embedding) scores the last hidden states in vocabulary chunks.

Memory is one block + the samples' hidden states (spilled to disk past a budget) + the head's weight, and does
not depend on depth. Under ``torchrun`` each rank runs its slice of the samples (see :mod:`surgeon.engine.dist`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.engine import dist
from surgeon.engine.stats import InputStats, StatsHooks, input_width
from surgeon.engine.store import HiddenStore, SpillStore
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.arch import Roles
    from surgeon.graph import Graph, Node

VOCAB_CHUNK = 8192  # output-embedding rows cast to the compute dtype at a time by the head
DEFAULT_HIDDEN_BUDGET = 1 << 30  # bytes of hidden states kept in RAM before spilling (no --max-memory)


class _Stop(Exception):
    pass


def cache_keyword(skeleton: nn.Module) -> str:
    """The name under which ``skeleton``'s forward takes its KV cache (``past_key_values``; ``cache`` since
    transformers 5.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(skeleton.forward).parameters else "past_key_values"


def first_block_inputs(skeleton: nn.Module, first: str, **forward_kw: Any) -> tuple[tuple, dict[str, Any]]:
    """Run ``skeleton(**forward_kw)`` without gradients until its first decoder block (``first``, a module path) is
    called, and return the positional and keyword arguments that block received (hidden states included): what
    the family's own code builds for its layers (positions, rotary embeddings, mask, cache)."""
    got: dict[str, Any] = {}

    def hook(module, args, kwargs):
        got["args"], got["kwargs"] = args, dict(kwargs)
        raise _Stop

    handle = skeleton.get_submodule(first).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            skeleton(**forward_kw)
    except _Stop:
        return got["args"], got["kwargs"]
    finally:
        handle.remove()
    raise SurgeonError(f"engine: the model never called its first block {first!r}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _dtype_size(dt: torch.dtype) -> int:
    return torch.finfo(dt).bits // 8 if dt.is_floating_point else 8


@dataclass
class MicroBatch:
    """Global sample indices of one micro-batch and the keyword arguments its layers receive."""

    indices: list[int]
    kwargs: dict[str, Any]
    length: int


@dataclass
class HeadOutput:
    """Per sample (global index -> tensor of its ``L - 1`` next-token predictions): NLL (fp64) and argmax."""

    nll: dict[int, torch.Tensor] = field(default_factory=dict)
    argmax: dict[int, torch.Tensor] = field(default_factory=dict)


def _assign(module: nn.Module, name: str, value: torch.Tensor, *, is_param: bool) -> None:
    mod_name, _, leaf = name.rpartition(".")
    sub = module.get_submodule(mod_name) if mod_name else module
    if is_param:
        sub._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        sub._buffers[leaf] = value


def block_output(module: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder block ``module`` returns for ``hidden`` and a micro-batch's keyword arguments
    (blocks of some families return a tuple)."""
    out = module(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class Block:
    """One decoder block, loaded, as an op sees it.

    ``names``: graph tensor name -> parameter name inside :attr:`module` (``self_attn.q_proj.weight``).
    Change a tensor in place (``block.param(n).masked_fill_(...)``) or with :meth:`set`; the engine notices
    and recomputes the block's outputs before they feed the next block.
    """

    def __init__(self, engine: Engine, index: int, module: nn.Module, names: dict[str, str]):
        self.engine, self.index, self.module, self.names = engine, index, module, names
        self.prefix = engine.roles.prefixes[index]
        self._versions = {g: self.param(g)._version for g in names}
        self._set: set[str] = set()
        self.outputs: HiddenStore | None = None  # outputs computed by observe(), valid while unchanged
        self._outputs_at: dict[str, int] | None = None

    # lookup ------------------------------------------------------------------------------------------------
    def param(self, name: str) -> nn.Parameter:
        """The live parameter of graph tensor ``name``."""
        return self.module.get_parameter(self._pname(name))

    def module_of(self, name: str) -> tuple[nn.Module, str]:
        """(submodule, leaf) holding graph tensor ``name`` (``q_proj`` Linear, ``"weight"``)."""
        path, _, leaf = self._pname(name).rpartition(".")
        return (self.module.get_submodule(path) if path else self.module), leaf

    def _pname(self, name: str) -> str:
        try:
            return self.names[name]
        except KeyError:
            raise SurgeonError(f"engine: {name!r} is not a tensor of decoder block {self.index} "
                               f"(prefix {self.prefix!r})") from None

    def set(self, name: str, value: torch.Tensor) -> None:
        """Replace tensor ``name`` (cast to the compute dtype, moved to the device)."""
        p = self.param(name)
        if tuple(value.shape) != tuple(p.shape):
            raise SurgeonError(f"engine: {name}: new value has shape {list(value.shape)}, expected {list(p.shape)}")
        _assign(self.module, self._pname(name), value.detach().to(device=p.device, dtype=p.dtype), is_param=True)
        self._set.add(name)

    def changed(self) -> list[str]:
        """Graph names of the tensors changed since the block was loaded."""
        return [g for g in self.names if g in self._set or self.param(g)._version != self._versions[g]]

    def _state(self) -> dict[str, int]:
        return {g: self.param(g)._version + (1 << 40 if g in self._set else 0) for g in self.names}

    # running -----------------------------------------------------------------------------------------------
    def inputs(self) -> Iterator[tuple[MicroBatch, torch.Tensor]]:
        """This rank's micro-batches and the block's input hidden states ``X [b, L, d]`` for each."""
        store = self.engine._hidden
        for i, mb in enumerate(self.engine._batches):
            yield mb, store.get(i, self.engine.device)

    @property
    def n_batches(self) -> int:
        """Number of this rank's micro-batches."""
        return len(self.engine._batches)

    def input(self, j: int) -> tuple[MicroBatch, torch.Tensor]:
        """Micro-batch ``j`` and the block's input for it (random access, e.g. for training steps)."""
        return self.engine._batches[j], self.engine._hidden.get(j, self.engine.device)

    def call(self, hidden: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """The block's output for ``hidden`` (no grad unless the caller enables it)."""
        return block_output(self.module, hidden, mb.kwargs)

    def forward(self, *, keep: bool = True) -> HiddenStore | None:
        """Run the block over every micro-batch; with ``keep`` the outputs are stored (they become the next
        block's inputs if the block is not changed afterwards)."""
        outs = self.engine._new_store() if keep else None
        with torch.no_grad():
            for mb, h in self.inputs():
                y = self.call(h, mb)
                if outs is not None:
                    outs.append(y)
                del h, y
        if keep:
            self.outputs, self._outputs_at = outs, self._state()
        return outs

    def observe(self, requests: dict[str, Sequence[str]], *, acc_dtype: torch.dtype = torch.float64,
                transposed: set[str] | frozenset = frozenset()) -> dict[str, InputStats]:
        """Input statistics of the modules holding the requested tensors (``{graph name: ("sq_norm", ...)}``),
        over every sample, summed over data-parallel ranks. The pass's outputs are kept (see :meth:`forward`)."""
        watched = {}
        for name, kinds in requests.items():
            mod, _ = self.module_of(name)
            width = input_width(mod, self.param(name), transposed=name in transposed)
            watched[name] = (mod, InputStats(width, tuple(kinds), acc_dtype, self.engine.device))
        hooks = StatsHooks(watched)
        try:
            self.forward(keep=True)
        finally:
            hooks.close()
        for st in hooks.stats.values():
            st.all_reduce()
        return hooks.stats

    def capture(self, name: str, where: str = "input") -> list[torch.Tensor]:
        """The input (or output) of the module holding graph tensor ``name`` for every micro-batch (on the device;
        for small calibration sets: keys/values of an edit, a layer's reconstruction target)."""
        mod, _ = self.module_of(name)
        got: list[torch.Tensor] = []
        if where == "input":
            h = mod.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
        elif where == "output":
            h = mod.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
        else:
            raise SurgeonError(f"engine: capture where={where!r}: expected 'input' or 'output'")
        try:
            self.forward(keep=True)
        finally:
            h.remove()
        return got

    def _outputs(self) -> HiddenStore:
        if self.outputs is not None and self._outputs_at == self._state():
            return self.outputs
        return self.forward(keep=True)  # type: ignore[return-value]


class Engine:
    """Runs a causal LM held in ``graph`` block by block (see the module docstring).

    ``max_memory`` (bytes): refuse when one block does not fit; hidden states beyond what is left spill to disk.
    ``roles``: the model's :class:`surgeon.arch.Roles` (from ``ctx.roles(graph)``); resolved here when omitted.
    ``group_by_length``: a micro-batch takes rows of equal length from anywhere in the samples, not only
    consecutive ones (results are keyed by sample index either way).
    """

    def __init__(self, graph: Graph, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 micro_batch: int = 8, max_memory: int | None = None, hidden_budget: int | None = None,
                 roles: Roles | None = None, check_finite: bool = True, spill_dir: str | None = None,
                 group_by_length: bool = False):
        from surgeon.model import _build_empty, _component_config, _torch_dtype, dense_graph

        self.graph = dense_graph(graph).copy()  # own node map: changed tensors are swapped in as they spill
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
        self.micro_batch = max(1, int(micro_batch))
        self.group_by_length = group_by_length  # micro-batches of equal-length rows from anywhere in the samples
        self.check_finite = check_finite
        self.roles = roles if roles is not None else _roles(self.graph)
        if self.roles.n_layers == 0:
            raise SurgeonError(f"engine: found no decoder blocks in this {self.roles.family} model")
        cfg = _component_config(self.graph, "")
        self.skeleton = _build_empty("causal-lm", cfg).eval()
        self.config = self.skeleton.config
        self.pnames = _graph_names(self.skeleton, self.graph.names())  # module param -> graph name
        self.layer_paths = [layer_path(self.skeleton, p) for p in self.roles.prefixes]
        self.spill = SpillStore(spill_dir)
        self.changed: dict[str, Node] = {}  # graph name -> lazy node of a tensor an op changed
        self.block_bytes = [self._block_bytes(i) for i in range(self.roles.n_layers)]
        largest = max(self.block_bytes)
        if max_memory is not None and largest > max_memory:
            i = self.block_bytes.index(largest)
            raise SurgeonError(f"--max-memory {_mb(max_memory)}: decoder block {self.roles.prefixes[i]!r} alone "
                               f"needs {_mb(largest)} in {str(self.dtype).removeprefix('torch.')}; raise --max-memory")
        if hidden_budget is None:
            hidden_budget = (max(max_memory - 2 * largest, 0) if max_memory is not None else DEFAULT_HIDDEN_BUDGET)
        self.hidden_budget = hidden_budget
        self.max_memory = max_memory  # --max-memory in bytes (None: not given)
        self._batches: list[MicroBatch] = []
        self._hidden = HiddenStore(None)
        self._globals_loaded = False
        self._rows: list[torch.Tensor] = []
        self.timings: list[float] = []

    # ---------------------------------------------------------------------------------------------- set-up
    def _read_unchecked(self, gname: str) -> torch.Tensor:
        """One graph tensor; a source tensor is read without the whole-tensor finiteness check (which makes an
        fp32 copy: 2 GB for a 128k x 4096 bf16 embedding): callers check the rows or chunks they use."""
        from surgeon.graph import Load

        node = self.graph[gname]
        if isinstance(node, Load):
            return node.checkpoint.load(node.name, check=False)
        return self.graph.value(gname)

    def _check(self, name: str, t: torch.Tensor) -> None:
        if self.check_finite:
            from surgeon.checkpoint import check_finite as refuse_nonfinite

            refuse_nonfinite(name, t)

    def _block_bytes(self, i: int) -> int:
        p = self.layer_paths[i] + "."
        return sum(math.prod(self.graph[g].shape) * _dtype_size(self.dtype)
                   for m, g in self.pnames.items() if m.startswith(p))

    def _new_store(self) -> HiddenStore:
        return HiddenStore(self.hidden_budget)

    def _load(self, pnames: list[str]) -> None:
        from surgeon.checkpoint import check_finite as refuse_nonfinite
        from surgeon.graph import Load

        params = {n for n, _ in self.skeleton.named_parameters(remove_duplicate=False)}
        with torch.no_grad():
            for pname, (gname, value) in zip(pnames, self.graph.values([self.pnames[p] for p in pnames])):
                if self.check_finite and not isinstance(self.graph[gname], Load):  # a Load checked on reading
                    refuse_nonfinite(gname, value)
                is_param = pname in params
                v = value.to(device=self.device, dtype=self.dtype if is_param and value.is_floating_point() else None)
                _assign(self.skeleton, pname, v, is_param=is_param)
                del value, v

    def _unload(self, pnames: list[str]) -> None:
        params = {n for n, _ in self.skeleton.named_parameters(remove_duplicate=False)}
        for pname in pnames:
            if pname in params:
                p = self.skeleton.get_parameter(pname)
                _assign(self.skeleton, pname, torch.empty(p.shape, dtype=p.dtype, device="meta"), is_param=True)

    def _in_layer(self, pname: str) -> bool:
        return any(pname.startswith(lp + ".") for lp in self.layer_paths)

    def _load_globals(self) -> None:
        """Every tensor outside the blocks except the embedding matrices (norms, position tables)."""
        if self._globals_loaded:
            return
        emb = self._embed_pname()
        head = self._head_pname()
        rest = [p for p in self.pnames if not self._in_layer(p) and p not in (emb, head)]
        self._load(rest)
        for bname, buf in list(self.skeleton.named_buffers()):
            if buf.device != self.device and buf.device.type != "meta":
                _assign(self.skeleton, bname, buf.to(self.device), is_param=False)
        self._globals_loaded = True

    def _embed_pname(self) -> str:
        emb = self.skeleton.get_input_embeddings()
        return self._pname_of(emb, "weight", "input embedding")

    def _head_pname(self) -> str | None:
        head = self.skeleton.get_output_embeddings()
        return None if head is None else self._pname_of(head, "weight", "output embedding", required=False)

    def _pname_of(self, mod: nn.Module, leaf: str, what: str, required: bool = True) -> str:
        for n, m in self.skeleton.named_modules():
            if m is mod:
                p = f"{n}.{leaf}" if n else leaf
                if p in self.pnames or not required:
                    return p
        raise SurgeonError(f"engine: the {what} of this {self.roles.family} model is not in the checkpoint")

    def _graph_of(self, pname: str | None) -> str | None:
        if pname is None:
            return None
        if pname in self.pnames:
            return self.pnames[pname]
        if pname == self._head_pname() and self.roles.tied:
            return self.pnames[self._embed_pname()]
        return None

    # ---------------------------------------------------------------------------------------------- samples
    def _local(self, n: int) -> list[int]:
        return list(range(dist.rank(), n, dist.world()))

    def embed(self, samples: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Run this rank's ``samples`` (token id rows; a 2-D tensor or a list of 1-D tensors) up to block 0."""
        rows = [samples[i] for i in range(samples.shape[0])] if isinstance(samples, torch.Tensor) else list(samples)
        if not rows:
            raise SurgeonError("engine: no samples")
        self._load_globals()
        self._rows = rows
        local = self._local(len(rows))
        if self.group_by_length:  # many short rows of mixed lengths (an edit's prompts): fewer, fuller batches
            local.sort(key=lambda i: (rows[i].numel(), i))
        groups: list[list[int]] = []
        for i in local:
            if groups and len(groups[-1]) < self.micro_batch and rows[groups[-1][0]].numel() == rows[i].numel():
                groups[-1].append(i)
            else:
                groups.append([i])
        ids = torch.cat([rows[i].reshape(-1) for i in local]) if local else torch.zeros(1, dtype=torch.long)
        uniq = torch.unique(ids)
        emb_p = self._embed_pname()
        self._batches, self._hidden = [], self._new_store()
        try:
            with self.compact_embedding(uniq, self._read_unchecked(self.pnames[emb_p])):
                for g in groups:
                    x = torch.stack([rows[i].reshape(-1) for i in g])
                    compact = torch.searchsorted(uniq, x).to(self.device)
                    args, kw = first_block_inputs(self.skeleton, self.layer_paths[0], input_ids=compact,
                                                  use_cache=False)
                    hidden = args[0] if args else kw["hidden_states"]
                    kw.pop("hidden_states", None)
                    self._batches.append(MicroBatch(g, kw, x.shape[1]))
                    self._hidden.append(hidden.detach())
        finally:
            self._unload([emb_p])

    @contextmanager
    def compact_embedding(self, uniq: torch.Tensor, table: torch.Tensor) -> Iterator[None]:
        """The skeleton's input embedding holds only the rows ``uniq`` (sorted unique token ids) of ``table``, after
        the vocabulary and finiteness checks; ids index it through ``torch.searchsorted(uniq, ids)``. The
        embedding's ``padding_idx`` is off meanwhile (other row numbers; it only matters for gradients)."""
        emb_p = self._embed_pname()
        if int(uniq.max()) >= table.shape[0] or int(uniq.min()) < 0:
            raise SurgeonError(f"engine: token id {int(uniq.max())} is outside the vocabulary ({table.shape[0]})")
        rows = table[uniq]
        del table
        self._check(self.pnames[emb_p], rows)
        _assign(self.skeleton, emb_p, rows.to(device=self.device, dtype=self.dtype), is_param=True)
        del rows
        emb_mod = self.skeleton.get_submodule(emb_p.rpartition(".")[0])
        pad, emb_mod.padding_idx = getattr(emb_mod, "padding_idx", None), None
        try:
            yield
        finally:
            emb_mod.padding_idx = pad

    # ---------------------------------------------------------------------------------------------- blocks
    def load_block(self, i: int) -> Block:
        """Block ``i`` with its tensors read from the graph (and the changes of earlier blocks of this run)."""
        path = self.layer_paths[i]
        pn = [p for p in self.pnames if p.startswith(path + ".")]
        self._load(pn)
        names = {self.pnames[p]: p[len(path) + 1:] for p in pn}
        return Block(self, i, self.skeleton.get_submodule(path), names)

    def unload_block(self, block: Block) -> None:
        self._unload([f"{self.layer_paths[block.index]}.{p}" for p in block.names.values()])

    def blocks(self, samples, *, layers: Sequence[int] | None = None, record: bool = True,
               progress: Callable | None = None) -> Iterator[Block]:
        """Embed ``samples``, then yield each block (all, or ``layers``' range up to its last) loaded; after the
        caller's turn its outputs (recomputed if it changed) become the next block's inputs. With ``record``
        the tensors the op changed go to the spill store (:attr:`changed`)."""
        import time

        self.embed(samples)
        last = self.roles.n_layers if layers is None else max(layers) + 1
        wanted = set(range(last) if layers is None else layers)
        steps = range(last)
        it = progress(steps, last, "blocks") if progress is not None else steps
        for i in it:
            t0 = time.perf_counter()
            block = self.load_block(i)
            if i in wanted:
                yield block
                if record:
                    for g in block.changed():
                        node = self.graph[g]
                        self.changed[g] = self.spill.put(g, block.param(g).detach().to(node.dtype), label="engine")
                        self.graph.replace(g, self.changed[g])
            outs = block._outputs()
            self._hidden.clear()
            self._hidden = outs
            block.outputs = None
            self.unload_block(block)
            del block
            self.timings.append(time.perf_counter() - t0)

    def run(self, samples, *, observe: dict[str, Sequence[str]] | None = None,
            change: Callable[[Block, dict[str, InputStats]], None] | None = None, head: bool = False,
            layers: Sequence[int] | None = None, progress: Callable | None = None, record: bool = True,
            transposed: set[str] | frozenset = frozenset()) -> HeadOutput | None:
        """The declarative face: per block, gather ``observe`` statistics of the block's tensors
        (``{graph name: kinds}``; names outside the block are ignored), call ``change(block, stats)``, advance.
        With ``head`` the final hidden states are scored (:meth:`head`)."""
        observe = observe or {}
        wanted = set(range(self.roles.n_layers) if layers is None else layers)
        for block in self.blocks(samples, layers=layers, record=record, progress=progress):
            req = {n: k for n, k in observe.items() if n in block.names}
            stats = block.observe(req, transposed=transposed) if req else {}
            if change is not None and block.index in wanted:
                change(block, stats)
        return self.head() if head else None

    # ---------------------------------------------------------------------------------------------- head
    def head(self) -> HeadOutput:
        """Per-token NLL of the next token and the argmax prediction for every sample of this rank (the final
        norm, then the output embedding in chunks of :data:`VOCAB_CHUNK` rows with a running log-sum-exp)."""
        from surgeon.arch import logit_transform

        norm = _final_norm(self)
        head_p = self._head_pname()
        gname = self._graph_of(head_p)
        if gname is None:
            raise SurgeonError(f"engine: no output embedding (lm_head) in this {self.roles.family} model")
        graph = self.graph
        w = self._read_unchecked(gname)
        head_mod = self.skeleton.get_output_embeddings()
        bias_p = self._pname_of(head_mod, "bias", "bias", required=False) if getattr(head_mod, "bias", None) \
            is not None else None
        bias = graph.value(self.pnames[bias_p]) if bias_p in self.pnames else None
        transform = logit_transform(self.config.to_dict())
        out = HeadOutput()
        with torch.no_grad():
            for j, mb in enumerate(self._batches):
                h = self._hidden.get(j, self.device)
                h = norm(h) if norm is not None else h
                ids = torch.stack([self._rows[i].reshape(-1) for i in mb.indices])
                nll, am = _chunked_nll(h[:, :-1].reshape(-1, h.shape[-1]), w, bias,
                                       ids[:, 1:].reshape(-1).to(self.device), self.dtype, transform,
                                       check=(lambda c: self._check(gname, c)) if j == 0 else None)
                for k, gi in enumerate(mb.indices):
                    n = mb.length - 1
                    out.nll[gi] = nll[k * n:(k + 1) * n].cpu()
                    out.argmax[gi] = am[k * n:(k + 1) * n].cpu()
        return out

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output embedding ``[V, d]`` (stored dtype, not checked: callers check the chunks they use) and its
        bias (or None)."""
        gname = self._graph_of(self._head_pname())
        if gname is None:
            raise SurgeonError(f"engine: no output embedding (lm_head) in this {self.roles.family} model")
        head_mod = self.skeleton.get_output_embeddings()
        bias_p = self._pname_of(head_mod, "bias", "bias", required=False) if getattr(head_mod, "bias", None) \
            is not None else None
        bias = self.graph.value(self.pnames[bias_p]) if bias_p in self.pnames else None
        return self._read_unchecked(gname), bias

    def logits(self, hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None] | None = None
               ) -> torch.Tensor:
        """fp32 logits ``[n, V]`` of last-block hidden rows ``hidden [n, d]`` (:meth:`logit_slices` joined).
        Differentiable in ``hidden`` (for a few positions: an edit's value optimisation); ``head`` from
        :meth:`head_weights` (read once when called repeatedly)."""
        return torch.cat([part for _, part in self.logit_slices(hidden, head)], 1)

    def logit_slices(self, hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                     check: Callable[[torch.Tensor], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(v0, fp32 logits [n, ≤ VOCAB_CHUNK])`` of vocabulary ids ``v0..``: the final norm, one
        :data:`VOCAB_CHUNK`-row slice of the output embedding at a time cast to the compute dtype (``check``
        sees each cast slice), the family's logit transform (elementwise, so per slice)."""
        from surgeon.arch import logit_transform

        self._load_globals()
        norm = _final_norm(self)
        w, bias = head if head is not None else self.head_weights()
        h = (norm(hidden) if norm is not None else hidden).to(self.dtype)
        transform = logit_transform(self.config.to_dict())
        for v0 in range(0, w.shape[0], VOCAB_CHUNK):
            wc = w[v0:v0 + VOCAB_CHUNK].to(device=h.device, dtype=self.dtype)
            if check is not None:
                check(wc)
            part = h @ wc.T
            if bias is not None:
                part = part + bias[v0:v0 + VOCAB_CHUNK].to(device=h.device, dtype=self.dtype)
            part = part.float()
            yield v0, (transform(part) if transform is not None else part)

    def logits_at(self, samples, positions: Sequence[Sequence[int]], *, progress: Callable | None = None,
                  rows_per_call: int = 1024) -> list[torch.Tensor]:
        """fp32 logits ``[len(positions[i]), V]`` at the given positions of every sample (every block unchanged,
        then :meth:`logits` on the gathered rows only, ``rows_per_call`` at a time): an edit's metrics, greedy
        and sampled continuations. Under ``torchrun`` every rank gets every sample's logits."""
        if len(positions) != len(samples):
            raise SurgeonError(f"engine: {len(positions)} position lists for {len(samples)} samples")
        for _ in self.blocks(samples, record=False, progress=progress):
            pass
        picked, owner = [], []
        for j, mb in enumerate(self._batches):
            h = self._hidden.get(j, self.device)
            for k, gi in enumerate(mb.indices):
                pos = torch.as_tensor(list(positions[gi]), dtype=torch.long)
                if pos.numel() and (int(pos.max()) >= mb.length or int(pos.min()) < 0):
                    raise SurgeonError(f"engine: position {int(pos.max())} is outside sample {gi} "
                                       f"({mb.length} tokens)")
                picked.append(h[k, pos.to(self.device)])
                owner.append((gi, pos.numel()))
        head = self.head_weights()
        flat = torch.cat(picked) if picked else torch.zeros(0, self.config.hidden_size, device=self.device)
        with torch.no_grad():
            parts = [self.logits(flat[s:s + rows_per_call], head).cpu() for s in range(0, flat.shape[0],
                                                                                       rows_per_call)]
        out = torch.cat(parts) if parts else torch.zeros(0, head[0].shape[0])
        local, s = {}, 0
        for gi, n in owner:
            local[gi], s = out[s:s + n], s + n
        merged: dict[int, torch.Tensor] = {}
        for part in dist.gather_objects(local):
            merged.update(part)
        return [merged[i] for i in range(len(samples))]

    def score(self, samples, *, progress: Callable | None = None) -> HeadOutput:
        """Run every block unchanged and score ``samples`` with the head (eval)."""
        for _ in self.blocks(samples, record=False, progress=progress):
            pass
        return self.head()

    def timing(self) -> dict[str, float]:
        """Blocks run so far and their mean / max wall seconds (for reports and benchmarks)."""
        t = self.timings
        return {"engine_blocks": len(t), "engine_block_s_mean": round(sum(t) / len(t), 3) if t else 0.0,
                "engine_block_s_max": round(max(t), 3) if t else 0.0}

    def apply_changes(self, graph: Graph) -> Graph:
        """A copy of ``graph`` whose changed tensors are the spill store's lazy nodes."""
        out = graph.copy()
        for name, node in self.changed.items():
            out.replace(name, node)
        return out


# -------------------------------------------------------------------------------------------------- helpers
def _roles(graph: Graph) -> Roles:
    from surgeon.arch import LayerCountError, roles_for

    try:
        return roles_for(graph.config, graph.names())
    except LayerCountError:
        raise
    except SurgeonError as e:
        raise SurgeonError(f"engine: cannot find the decoder blocks of this model: {e}") from None


def _graph_names(module: nn.Module, names: list[str]) -> dict[str, str]:
    from surgeon.model import _param_name_map

    return _param_name_map(module, names, "")


def layer_path(module: nn.Module, prefix: str) -> str:
    """Submodule path of the decoder block whose tensors start with ``prefix`` (tries the base-model prefix)."""
    name = prefix.rstrip(".")
    base = getattr(module, "base_model_prefix", "") or ""
    cands = [name] + [name[len(b):] for b in ("model.", "transformer.") if name.startswith(b)]
    if base:
        cands += [f"{base}.{c}" for c in list(cands)]
    for cand in cands:
        try:
            module.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    raise SurgeonError(f"engine: decoder block {name!r} is not a submodule of the {type(module).__name__} "
                       "module built from config.json")


def _final_norm(engine: Engine):
    g = engine.roles.final_norm
    if g is None:
        return None
    p = next((m for m, gn in engine.pnames.items() if gn == g), None)
    if p is None:
        return None
    return engine.skeleton.get_submodule(p.rpartition(".")[0])


def _chunked_nll(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 dtype: torch.dtype, transform, check=None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL (fp64) of ``targets`` and the argmax over the vocabulary for hidden rows ``h [n, d]``, with the
    output embedding ``w [V, d]`` applied ``VOCAB_CHUNK`` rows at a time (running max / log-sum-exp)."""
    n = h.shape[0]
    dev = h.device
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    run_sum = torch.zeros(n, dtype=torch.float64, device=dev)
    arg = torch.zeros(n, dtype=torch.long, device=dev)
    tgt = torch.zeros(n, dtype=torch.float64, device=dev)
    for v0 in range(0, w.shape[0], VOCAB_CHUNK):
        wc = w[v0:v0 + VOCAB_CHUNK].to(device=dev, dtype=dtype)
        if check is not None:
            check(wc)
        logits = h @ wc.T
        if bias is not None:
            logits = logits + bias[v0:v0 + VOCAB_CHUNK].to(device=dev, dtype=dtype)
        logits = logits.float()
        if transform is not None:
            logits = transform(logits)
        cmax, carg = logits.max(dim=1)
        new_max = torch.maximum(run_max, cmax)
        run_sum = run_sum * torch.exp((run_max - new_max).double()) + torch.exp(
            (logits - new_max[:, None]).double()).sum(1)
        arg = torch.where(cmax > run_max, carg + v0, arg)
        run_max = new_max
        inside = (targets >= v0) & (targets < v0 + wc.shape[0])
        if bool(inside.any()):
            rows = inside.nonzero().squeeze(1)
            tgt[rows] = logits[rows, targets[rows] - v0].double()
        del wc, logits
    lse = run_max.double() + torch.log(run_sum)
    return lse - tgt, arg
