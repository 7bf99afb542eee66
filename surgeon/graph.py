# Over the module-length guide: the node kinds, the graph's edit API and the executor are one contract.
"""The lazy tensor graph: ``name -> Node``. Nodes know shape and dtype without computing anything.

Node kinds:
- :class:`Load`     a tensor of a source checkpoint (read on demand; may be copied byte-for-byte when untouched)
- :class:`Const`    a tensor held in memory (small, or produced by a model-level op)
- :class:`Apply`    ``fn(*input_values)``; tensor-wise ops build these
- :class:`Cast`     a dtype conversion (the ``cast`` op)
- :class:`LowRank`  ``base + up @ down`` computed in fp32 and cast once (rank-k edits stay rank-k until written)
- :class:`Reduce`   a streaming reduction over many inputs that holds only its accumulator (global thresholds)

:class:`Executor` evaluates outputs in the order asked, memoises values that several consumers share, and frees
each value right after its last consumer is done, so peak memory is a few tensors, not the model.

Nodes know their dtype by name (``dtype_name``; ``dtype`` is the torch dtype, imported on first use). A graph of
source tensors and casts runs without torch: such nodes say ``host = True`` and compute on raw storage in numpy
(:class:`surgeon.tensorfile.HostArray`, :mod:`surgeon.kernels.host_dtypes`), with the same bytes; the executor
converts between the two forms where a torch node consumes a host value.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError
from surgeon.tensorfile import (  # noqa: F401 (FLOAT_DTYPES re-exported for ops)
    FLOAT_DTYPES,
    HostArray,
    as_host,
    as_tensor,
    dtype_name,
    dtype_width,
    torch_dtype,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from surgeon.checkpoint import Checkpoint


class Node:
    """Base node: ``shape``/``dtype`` are known up front; ``compute`` gets the input values in order."""

    shape: tuple[int, ...]
    dtype_name: str  # "bfloat16", ...: known without torch
    inputs: tuple[Node, ...] = ()
    label: str = "node"
    host: bool = False  # compute_host works on raw storage (no torch) when every input's value can be host too
    finite: bool = False  # computing it already refuses NaN/Inf in its value: the writer does not check it again

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @dtype.setter
    def dtype(self, value: torch.dtype | str) -> None:
        self.dtype_name = dtype_name(value)

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_host(self, args: list[HostArray]) -> HostArray:
        raise NotImplementedError(f"{type(self).__name__} has no host computation")

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_width(self.dtype_name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label}, {list(self.shape)}, {self.dtype_name})"


class Load(Node):
    """A source tensor; nothing is read until computed."""

    label = "load"

    def __init__(self, checkpoint: Checkpoint, name: str):
        info = checkpoint.tensors[name]
        self.checkpoint = checkpoint
        self.name = name
        self.shape = tuple(info.shape)
        self.dtype_name = info.dtype
        self.host = checkpoint.pickle_state is None

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        return self.checkpoint.load(self.name)

    def compute_host(self, args: list[HostArray]) -> HostArray:
        return self.checkpoint.load_host(self.name)


class Const(Node):
    label = "const"

    def __init__(self, value: torch.Tensor, label: str = "const"):
        self.value = value.detach().contiguous()
        self.shape = tuple(value.shape)
        self.dtype = value.dtype
        self.label = label

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        return self.value


class Apply(Node):
    """``fn(*values_of_inputs)``. ``shape``/``dtype`` default to the first input's.

    ``host_fn``, when given, is the same computation on raw storage (``host_fn(*HostArray) -> HostArray``, any
    float dtype, same bytes as ``fn``): the node then runs without torch when its inputs can.

    ``stream_fn``, when given (same dtype as the last input), is the same computation piece by piece:
    ``stream_fn(whole last input, *values of the other inputs) -> piece_fn``, then ``piece_fn(piece)`` maps
    consecutive pieces of the last input's flat storage, in order, to the output's. When that input is an untouched
    source tensor and the others are small computed values (a threshold), the writer streams the node as it copies
    one (:func:`surgeon.executor.stream_run`), with no buffer of the tensor's size."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[Node], *, label: str,
                 shape: Sequence[int] | None = None, dtype: torch.dtype | str | None = None,
                 host_fn: Callable[..., HostArray] | None = None,
                 stream_fn: Callable[[HostArray], Callable[[np.ndarray], np.ndarray]] | None = None):
        from surgeon.kernels.host_dtypes import CONVERTIBLE

        if not inputs and (shape is None or dtype is None):
            raise ValueError("Apply without inputs needs shape and dtype")
        self.fn = fn
        self.host_fn = host_fn
        self.stream_fn = stream_fn
        self.inputs = tuple(inputs)
        self.label = label
        self.shape = tuple(shape) if shape is not None else self.inputs[0].shape
        self.dtype = dtype if dtype is not None else self.inputs[0].dtype_name
        self.host = host_fn is not None and self.dtype_name in CONVERTIBLE

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        out = self.fn(*args)
        if tuple(out.shape) != self.shape:
            raise SurgeonError(f"internal: {self.label} produced shape {list(out.shape)}, planned {list(self.shape)}")
        return out.to(self.dtype)

    def compute_host(self, args: list[HostArray]) -> HostArray:
        from surgeon.kernels.host_dtypes import CONVERTIBLE, convert

        assert self.host_fn is not None
        out = self.host_fn(*args)
        if out.data.size != self.nbytes // dtype_width(self.dtype_name) or out.dtype not in CONVERTIBLE:
            raise SurgeonError(f"internal: {self.label} produced {out.data.size} {out.dtype} values, planned "
                               f"{list(self.shape)} {self.dtype_name}")
        data = out.data if out.dtype == self.dtype_name else convert(out.data, out.dtype, self.dtype_name)
        return HostArray(data.reshape(-1), self.dtype_name, self.shape)


class Cast(Node):
    """``source`` converted to ``dtype``. Between float64/32/16 and bfloat16 it also runs without torch (numpy on
    the raw storage, :func:`surgeon.kernels.host_dtypes.convert`), with the bytes torch's ``.to`` gives."""

    def __init__(self, source: Node, dtype: torch.dtype | str, *, label: str = "cast"):
        from surgeon.kernels.host_dtypes import CONVERTIBLE

        self.inputs = (source,)
        self.shape = source.shape
        self.dtype = dtype
        self.label = label
        self.host = source.dtype_name in CONVERTIBLE and self.dtype_name in CONVERTIBLE

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        return args[0].to(self.dtype)

    def compute_host(self, args: list[HostArray]) -> HostArray:
        from surgeon.kernels.host_dtypes import convert

        (value,) = args
        return HostArray(convert(value.data, value.dtype, self.dtype_name), self.dtype_name, self.shape)


class LowRank(Node):
    """``base + up @ down`` (``up``: [out, r], ``down``: [r, in]); with ``transposed`` the delta is added as its
    transpose (GPT-2 Conv1D stores Wᵀ). Computed in fp32, cast once to the base dtype."""

    def __init__(self, base: Node, up: torch.Tensor, down: torch.Tensor, *, transposed: bool = False,
                 label: str = "low-rank"):
        self.inputs = (base,)
        self.up = up.detach().float().contiguous()
        self.down = down.detach().float().contiguous()
        self.transposed = transposed
        self.shape = base.shape
        self.dtype = base.dtype
        self.label = label
        rows, cols = (self.shape[1], self.shape[0]) if transposed else (self.shape[0], self.shape[1])
        if self.up.shape[0] != rows or self.down.shape[1] != cols or self.up.shape[1] != self.down.shape[0]:
            raise SurgeonError(f"low-rank update {list(self.up.shape)}x{list(self.down.shape)} does not fit "
                               f"a tensor of shape {list(self.shape)}")

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def delta(self) -> torch.Tensor:
        d = self.up @ self.down
        return d.T if self.transposed else d

    def compute(self, args: list[torch.Tensor]) -> torch.Tensor:
        return (args[0].float() + self.delta()).to(self.dtype)


class Reduce(Node):
    """A reduction that streams its inputs one at a time: ``finish(fold(step, init(*given), values))``.

    ``given`` are nodes whose values ``init`` needs (e.g. a first pass's result); the executor hands the other
    inputs in order and frees each one after ``step(acc, value, index)`` unless another consumer needs it. With
    ``merge(acc_a, acc_b)`` (folds over consecutive runs of the inputs combine into the fold over both), the
    reduction can be split into map tasks over chunks of its inputs (``--executor ray``).
    """

    def __init__(self, inputs: Sequence[Node], *, init: Callable[..., Any],
                 step: Callable[[Any, torch.Tensor, int], Any], finish: Callable[[Any], torch.Tensor],
                 shape: Sequence[int], dtype: torch.dtype, label: str, given: Sequence[Node] = (),
                 merge: Callable[[Any, Any], Any] | None = None):
        self.given = tuple(given)
        self.streamed = tuple(inputs)
        self.inputs = self.given + self.streamed
        self.init, self.step, self.finish, self.merge = init, step, finish, merge
        self.shape = tuple(shape)
        self.dtype = dtype
        self.label = label

    def fold(self, given: Sequence[torch.Tensor], values: Iterator[torch.Tensor], start: int = 0) -> Any:
        """``step`` over ``values`` (the streamed inputs from index ``start`` on), from ``init(*given)``."""
        acc = self.init(*given)
        for i, v in enumerate(values, start):
            acc = self.step(acc, v, i)
        return acc

    def run(self, values: Iterator[torch.Tensor]) -> torch.Tensor:
        given = [next(values) for _ in self.given]
        return self.finish(self.fold(given, values))


@dataclass
class Graph:
    """An ordered ``name -> Node`` map plus everything the writer needs besides tensors.

    ``configs`` maps component ("" for a plain model) to its config dict; ``extra_files`` holds op outputs
    (e.g. ``rece.json``) as text/bytes; ``results`` holds eval tables that go to the model card.
    """

    nodes: dict[str, Node]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    weight_stems: dict[str, str] = field(default_factory=dict)  # component -> "model" | "diffusion_pytorch_model"
    side_files: dict[str, Any] = field(default_factory=dict)  # relative path -> source Path
    extra_files: dict[str, str | bytes] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    sources: list[Checkpoint] = field(default_factory=list)
    base_model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # free-form per-op info for provenance

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> Graph:
        nodes: dict[str, Node] = {name: Load(ck, name) for name in ck.tensors}
        configs = {c.name: copy.deepcopy(c.config) for c in ck.components.values() if c.config is not None}
        stems = {c.name: c.weights_stem for c in ck.components.values()}
        return cls(nodes, configs, stems, dict(ck.side_files), sources=[ck], base_model=guess_base_model(ck))

    # dict-like access -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise SurgeonError(f"no tensor named {name!r} in the model") from None

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def names(self) -> list[str]:
        return list(self.nodes)

    @property
    def config(self) -> dict[str, Any]:
        """The root component's config (a mutable copy owned by this graph)."""
        return self.configs.setdefault("", {})

    def copy(self) -> Graph:
        """A new graph sharing nodes (nodes are immutable) with its own maps and configs."""
        g = copy.copy(self)
        g.nodes = dict(self.nodes)
        g.configs = copy.deepcopy(self.configs)
        g.weight_stems = dict(self.weight_stems)
        g.side_files = dict(self.side_files)
        g.extra_files = dict(self.extra_files)
        g.results = list(self.results)
        g.tags = list(self.tags)
        g.sources = list(self.sources)
        g.meta = copy.deepcopy(self.meta)
        return g

    def value(self, name: str) -> torch.Tensor:
        """Compute one tensor now (for model-level ops and tests)."""
        return Executor([self[name]]).evaluate_all()[0]

    def values(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream several tensors with shared sub-results computed once and freed after their last use."""
        names = list(names)
        ex = Executor([self[n] for n in names])
        for n in names:
            node = self[n]
            v = ex.value(node)
            ex.release(node)
            yield n, v

    def items(self) -> Iterator[tuple[str, Node]]:
        return iter(list(self.nodes.items()))

    # edits (ops change a graph only through these) ----------------------------------------------------------
    def replace(self, name: str, node: Node) -> None:
        """Put ``node`` in place of the existing tensor ``name`` (same position in model order)."""
        self[name]
        self.nodes[name] = node

    def add(self, name: str, node: Node) -> None:
        """Append a new tensor (an error if ``name`` exists: use :meth:`replace`)."""
        if name in self.nodes:
            raise SurgeonError(f"internal: tensor {name!r} already exists (use replace)")
        self.nodes[name] = node

    def insert_after(self, anchor: str, new: Mapping[str, Node]) -> None:
        """Insert ``new`` tensors right after ``anchor``, in their given order."""
        self[anchor]
        clash = [n for n in new if n in self.nodes]
        if clash:
            raise SurgeonError(f"internal: tensor {clash[0]!r} already exists (use replace)")
        out: dict[str, Node] = {}
        for key, node in self.nodes.items():
            out[key] = node
            if key == anchor:
                out.update(new)
        self.nodes = out

    def splice(self, name: str, new: Mapping[str, Node]) -> None:
        """Replace tensor ``name`` by the tensors ``new`` at its position (one weight -> its packed parts)."""
        self[name]
        clash = [n for n in new if n in self.nodes and n != name]
        if clash:
            raise SurgeonError(f"internal: tensor {clash[0]!r} already exists")
        out: dict[str, Node] = {}
        for key, node in self.nodes.items():
            if key == name:
                out.update(new)
            else:
                out[key] = node
        self.nodes = out

    def remove(self, *names: str) -> None:
        for n in names:
            self[n]
        for n in names:
            del self.nodes[n]

    def reorder(self, order: Sequence[str], new: Mapping[str, Node] | None = None) -> None:
        """Make the graph exactly ``order``: each name's node from ``new`` when given there, else the current
        one; names in neither are an error, current names left out are dropped."""
        new = new or {}
        missing = [n for n in order if n not in new and n not in self.nodes]
        if missing:
            raise SurgeonError(f"internal: reorder names {missing[0]!r}, which is neither in the graph nor new")
        if len(set(order)) != len(order):
            raise SurgeonError("internal: reorder lists a tensor twice")
        self.nodes = {n: new[n] if n in new else self.nodes[n] for n in order}

    def rename(self, mapping: Mapping[str, str]) -> None:
        """Rename tensors in place (model order kept); two tensors ending on one name is an error."""
        out: dict[str, Node] = {}
        for key, node in self.nodes.items():
            target = mapping.get(key, key)
            if target in out:
                raise SurgeonError(f"{key!r} and another tensor would both become {target!r}")
            out[target] = node
        self.nodes = out

    def untouched(self, name: str) -> bool:
        """True when the tensor is still the source's bytes (a byte-for-byte copy is allowed)."""
        return isinstance(self.nodes.get(name), Load)


def guess_base_model(ck: Checkpoint) -> str | None:
    cfg = ck.config
    name = cfg.get("_name_or_path") if isinstance(cfg, dict) else None
    src = ck.source_id
    if src and "/" in src and not src.startswith((".", "/", "~")) and src.count("/") == 1 and not Path(src).exists():
        return src  # a repo id, not a local folder that happens to have one slash
    if isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/")):
        return name
    return None


def reachable(outputs: Sequence[Node]) -> Iterator[Node]:
    """Every node that ``outputs`` depend on (themselves included), each once."""
    stack = list(outputs)
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(node.inputs)


def runs_on_host(node: Node) -> bool:
    """True when ``node`` and everything it depends on compute on raw storage, without torch."""
    return node.host and all(runs_on_host(i) for i in node.inputs)


class Executor:
    """Evaluates nodes with reference-counted memoisation; safe to call from several threads.

    ``refs[node]`` counts the edges into a node from the nodes reachable from the outputs plus one per time it
    is an output. A value is cached while more than one consumer remains and dropped at its last ``release``.
    A node that one thread is computing is awaited, not recomputed, by the others. ``live`` / ``max_live``
    count cached values (a spy for tests).
    """

    def __init__(self, outputs: Sequence[Node]):
        self.refs: dict[int, int] = {}
        self.cache: dict[int, torch.Tensor | HostArray] = {}
        self.max_live = 0
        self._lock = threading.Lock()
        self._computing: dict[int, Future] = {}
        for o in outputs:
            self.refs[id(o)] = self.refs.get(id(o), 0) + 1
        for node in reachable(outputs):
            for i in node.inputs:
                self.refs[id(i)] = self.refs.get(id(i), 0) + 1
        self.outputs = list(outputs)

    @property
    def live(self) -> int:
        return len(self.cache)

    def value(self, node: Node) -> torch.Tensor:
        """``node``'s value as a torch tensor."""
        return as_tensor(self._value(node, host=False))

    def host_value(self, node: Node) -> HostArray:
        """``node``'s value as raw storage; computed without torch where :func:`runs_on_host` says so."""
        return as_host(self._value(node, host=runs_on_host(node)))

    def _value(self, node: Node, host: bool) -> torch.Tensor | HostArray:
        key = id(node)
        with self._lock:
            if key in self.cache:
                return self.cache[key]
            pending = self._computing.get(key)
            if pending is None:
                self._computing[key] = Future()
        if pending is not None:  # another thread computes it; it is cached for us (refs > 1)
            return pending.result()
        try:
            v = self._compute(node, host)
        except BaseException as e:
            with self._lock:
                self._computing.pop(key).set_exception(e)
            raise
        with self._lock:
            if self.refs.get(key, 0) > 1:
                self.cache[key] = v
                self.max_live = max(self.max_live, len(self.cache))
            self._computing.pop(key).set_result(v)
        return v

    def _compute(self, node: Node, host: bool) -> torch.Tensor | HostArray:
        if isinstance(node, Reduce):
            return node.run(self._stream(node.inputs))
        if host:
            v = node.compute_host([self.host_value(i) for i in node.inputs])
        else:
            args = [self.value(i) for i in node.inputs]
            v = node.compute(args)
            del args
        for i in node.inputs:
            self.release(i)
        return v

    def _stream(self, inputs: Sequence[Node]) -> Iterator[torch.Tensor]:
        for i in inputs:
            v = self.value(i)
            yield v
            del v
            self.release(i)

    def release(self, node: Node) -> None:
        key = id(node)
        with self._lock:
            n = self.refs.get(key, 0) - 1
            self.refs[key] = n
            if n <= 0:
                self.cache.pop(key, None)

    def evaluate_all(self) -> list[torch.Tensor]:
        out = []
        for o in self.outputs:
            out.append(self.value(o))
            self.release(o)
        return out
