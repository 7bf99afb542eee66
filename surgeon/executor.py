"""The local executor: writes a graph's planned shards as a pipeline bounded by a memory budget.

Tensor-wise work is I/O bound, so the writer keeps the disk busy while everything else happens beside it:
- **Computed tensors** are computed ahead, in shard order, on a small thread pool (reading their sources is the
  read-ahead: ``os.preadv`` and torch kernels release the GIL), while the writer thread writes finished ones in
  order. What is in flight (computed, not yet written) never exceeds the memory budget, so peak memory is the
  budget plus one tensor, whatever the model size.
- **Untouched tensors** are copied on the pool, straight into their planned place in the file: a run of
  tensors that lie back to back in one source file is one task, written from a read-only map of the source a
  window at a time. Unless ``--allow-nonfinite``, each float tensor's bytes are checked for NaN/Inf just before
  they are written, while still in the cache, so the check costs no second pass; a failure is raised before the
  output folder is renamed into place. (Measured on ext4: faster than ``copy_file_range``, which splices page
  by page, even without the check; docs/cluster.md.)
- **Casts of source tensors** (``cast``) are converted and written the same way, ``CAST_PIECE`` bytes of source
  at a time: no buffer of the tensor's size.
- **Shard files are written at once**: the next file's work starts while the last one's copies still run
  (ext4 serialises the writers of one file, not of different files), and each file is reserved to its final
  size first (``fallocate``).

The bytes written are exactly those of the plain one-tensor-at-a-time order (the header is planned from shapes
and dtypes; each tensor goes to its planned offset).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError
from surgeon.tensorfile import FLOAT_DTYPES, HostArray, dtype_width

if TYPE_CHECKING:
    import numpy as np
    import torch

    from surgeon.graph import Executor, Graph, Node

COPY_WINDOW = 32 << 20  # bytes of a source file mapped at once by each copy (counted in RSS while mapped)
CAST_PIECE = 8 << 20  # source bytes converted at a time by a streamed cast (fewer Python steps; still in cache)
WRITE_CHUNK = 1 << 20  # bytes per write (4 MiB writes had 1-2 s sys-time stalls in 1 run of 5 on this VM's ext4)
MIN_BUDGET = 256 << 20
DEFAULT_BUDGET = 512 << 20


def available_memory() -> int:
    """Bytes of memory the kernel says are available (``MemAvailable``), or 4 GiB where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def memory_budget(max_memory: str | int | None, largest_task: int = 0) -> int:
    """Bytes the pipeline may hold in flight: ``--max-memory`` when given; else room for two of the largest
    tensor's computations (at least 512 MiB; reading further ahead does not make a disk faster), never more than a
    quarter of the available memory."""
    from surgeon.outputs import parse_size

    if max_memory is not None and max_memory != "":
        budget = parse_size(max_memory, flag="--max-memory")
        if budget < MIN_BUDGET:
            raise SurgeonError(f"--max-memory: {budget} bytes is below the minimum of {MIN_BUDGET >> 20} MiB")
        return budget
    return max(MIN_BUDGET, min(available_memory() // 4, max(DEFAULT_BUDGET, 2 * largest_task)))


def compute_workers() -> int:
    """Threads that compute ahead of the writer: one per core, at most four (the writer mostly waits on the disk;
    on 2 cores, 2 compute threads prune SmolLM2 in 1.6 s where 1 takes 2.0 s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def task_cost(node: Node) -> int:
    """Bytes a computed tensor holds at its peak: its value plus its direct inputs'."""
    return node.nbytes + sum(i.nbytes for i in node.inputs)


# ---------------------------------------------------------------------------------------------------------------
# copies of untouched tensors


@dataclass
class _CopyRun:
    """Untouched tensors that lie back to back both in one source file and in the output: copied as one range.
    ``tensors`` holds each one's name, dtype and size, in order, for the finiteness check."""

    file: Path | None = None
    begin: int = 0
    nbytes: int = 0
    at: int = 0
    tensors: list[tuple[str, str, int]] = field(default_factory=list)

    def extend(self, name: str, dtype: str, file: Path, begin: int, nbytes: int, at: int) -> bool:
        """Take the next tensor when it continues this run in the source and in the output."""
        if self.file is None or file != self.file or begin != self.begin + self.nbytes or at != self.at + self.nbytes:
            return False
        self.nbytes += nbytes
        self.tensors.append((name, dtype, nbytes))
        return True


def copy_pieces(run: _CopyRun, check: bool, piece: int = WRITE_CHUNK) -> Iterator[tuple[int, int, str, str]]:
    """The run cut into pieces of at most ``piece`` bytes that end on element boundaries, in order:
    (offset in the run, bytes, tensor name, dtype to check, or "" when nothing is checked)."""
    offset = 0
    for name, dtype, nbytes in run.tensors:
        checked = dtype if check and dtype in FLOAT_DTYPES else ""
        width = dtype_width(dtype)
        step = max(width, piece // width * width)
        for lo in range(0, nbytes, step):
            yield offset + lo, min(step, nbytes - lo), name, checked
        offset += nbytes


def batches(pieces: Iterator[tuple[int, int, str, str]]) -> Iterator[list[tuple[int, int, str, str]]]:
    """Consecutive pieces grouped so that each group spans at most ``WRITE_CHUNK`` bytes (one write)."""
    batch: list[tuple[int, int, str, str]] = []
    for piece in pieces:
        if batch and piece[0] + piece[1] - batch[0][0] > WRITE_CHUNK:
            yield batch
            batch = []
        batch.append(piece)
    if batch:
        yield batch


class SourceWindow:
    """A run's source bytes through a read-only view of the file: ``COPY_WINDOW`` bytes mapped at a time, the
    previous window unmapped first (read into a buffer where the system cannot map)."""

    def __init__(self, run: _CopyRun):
        self.run = run
        self.data: np.ndarray | None = None
        self.lo = 0

    def get(self, lo: int, hi: int) -> np.ndarray:
        """Bytes ``[lo, hi)`` of the run, as a uint8 array."""
        from surgeon.checkpoint import read_exact
        from surgeon.filemap import map_bytes

        run = self.run
        assert run.file is not None
        if self.data is None or lo < self.lo or hi > self.lo + len(self.data):
            self.data = None
            self.lo = lo
            self.data = map_bytes(run.file, run.begin + lo, min(max(COPY_WINDOW, hi - lo), run.nbytes - lo))
            if self.data is None:
                import numpy as np

                self.data = np.empty(hi - lo, dtype=np.uint8)
                read_exact(run.file, run.begin + lo, self.data.data)
        return self.data[lo - self.lo: hi - self.lo]


def copy_run(run: _CopyRun, fd: int, check: bool) -> None:
    """Write the run's source bytes at ``run.at`` of ``fd`` from a :class:`SourceWindow`, ``WRITE_CHUNK`` bytes
    per write; with ``check``, each float tensor's bytes are checked for NaN/Inf just before they are written,
    while still in the cache.

    On ext4 this writes 2 GiB in 0.18-0.25 s where ``copy_file_range`` (a splice, page by page) takes 0.23-0.29 s
    and a separate check pass adds 0.1 s (docs/cluster.md)."""
    from surgeon.checkpoint import check_finite_host
    from surgeon.kernels.host_dtypes import STORAGE

    source = SourceWindow(run)
    for batch in batches(copy_pieces(run, check)):
        lo, hi = batch[0][0], batch[-1][0] + batch[-1][1]
        data = source.get(lo, hi)
        for at, n, name, dtype in batch:
            if dtype:
                check_finite_host(name, HostArray(data[at - lo: at - lo + n].view(STORAGE[dtype]), dtype, (-1,)))
        pwrite_all(fd, data.data, run.at + lo)


def _piece_run(run: _CopyRun, source: SourceWindow, fd: int, piece_fn: Callable[[np.ndarray], np.ndarray],
               dtype: str, piece: int, check_source: bool, check_name: str | None) -> None:
    """Write the run's one source tensor turned into ``dtype`` by ``piece_fn`` (consecutive pieces of at most
    ``piece`` source bytes, in order) at ``run.at`` of ``fd``, each piece written while still in the cache.
    ``check_source``: refuse NaN/Inf in the source; ``check_name`` (the output's name, or None): refuse them in
    the result."""
    from surgeon.checkpoint import check_finite_host
    from surgeon.kernels.host_dtypes import STORAGE

    ((name, src, _),) = run.tensors
    scale = (dtype_width(dtype), dtype_width(src))
    for lo, n, _, _ in copy_pieces(run, False, piece):
        x = source.get(lo, lo + n).view(STORAGE[src])
        if check_source:
            check_finite_host(name, HostArray(x, src, (-1,)))
        y = piece_fn(x)
        if check_name is not None:
            check_finite_host(check_name, HostArray(y, dtype, (-1,)))
        pwrite_all(fd, y.data, run.at + lo * scale[0] // scale[1])


def cast_run(run: _CopyRun, fd: int, dtype: str, check_source: bool, check_name: str | None) -> None:
    """Write one source tensor (the run's only one) converted to ``dtype`` at ``run.at`` of ``fd``, ``CAST_PIECE``
    source bytes at a time (:func:`surgeon.kernels.host_dtypes.convert` is elementwise, so the bytes are the whole
    tensor's): no buffer of the tensor's size is ever made. ``check_source``: refuse NaN/Inf in the source;
    ``check_name`` (the output's name, or None): refuse them in the result (a float32 value past bfloat16's range
    is Inf)."""
    from surgeon.kernels.host_dtypes import convert

    src = run.tensors[0][1]
    _piece_run(run, SourceWindow(run), fd, lambda x: convert(x, src, dtype), dtype, CAST_PIECE, check_source,
               check_name)


def stream_run(run: _CopyRun, fd: int, stream_fn: Callable, check_name: str | None,
               given: Callable[[], list] = list) -> None:
    """Write an op's piecewise computation of one source tensor (the run's only one; ``Apply.stream_fn``) at
    ``run.at`` of ``fd``: ``stream_fn`` sees the whole source through its map (and ``given()``, the values of the
    node's other, small inputs), then its piece function turns each ``WRITE_CHUNK`` of source into the output's
    bytes (:func:`_piece_run`, from the same map). ``check_name`` (the output's name, or None): refuse NaN/Inf in
    the result."""
    from surgeon.kernels.host_dtypes import STORAGE

    ((_, src, nbytes),) = run.tensors
    source = SourceWindow(run)
    piece_fn = stream_fn(HostArray(source.get(0, nbytes).view(STORAGE[src]), src, (-1,)), *given())
    _piece_run(run, source, fd, piece_fn, src, WRITE_CHUNK, False, check_name)


#: the most bytes a streamed node's inputs besides its source may hold (a threshold, a few counts)
GIVEN_MAX = 1 << 20


def streams_pieces(node: Node) -> bool:
    """An op's computation of one untouched source tensor (its last input; any others are small computed
    values, such as a global threshold) that :func:`stream_run` writes piece by piece."""
    from surgeon.graph import Apply
    from surgeon.kernels.host_dtypes import CONVERTIBLE

    return (isinstance(node, Apply) and node.stream_fn is not None and node.dtype_name in CONVERTIBLE
            and bool(node.inputs) and is_copy(node.inputs[-1]) and node.dtype_name == node.inputs[-1].dtype_name
            and all(not is_copy(i) and i.nbytes <= GIVEN_MAX for i in node.inputs[:-1]))


def streams_cast(node: Node) -> bool:
    """A cast of an untouched safetensors source tensor that :func:`cast_run` writes piece by piece: the
    conversion runs on the host and its NaN bits do not depend on the element's place (see host_dtypes)."""
    from surgeon.graph import Cast
    from surgeon.kernels.host_dtypes import TORCH_DECIDES_NAN

    return (isinstance(node, Cast) and node.host and is_copy(node.inputs[0])
            and (node.inputs[0].dtype_name, node.dtype_name) not in TORCH_DECIDES_NAN)


def write_all(fd: int, data: memoryview | bytes) -> None:
    """``os.write`` until every byte is written (a single call may write less)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data: memoryview | bytes, at: int) -> None:
    """``os.pwrite`` at offset ``at`` until every byte is written, ``WRITE_CHUNK`` bytes per call (the file
    position does not move)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + WRITE_CHUNK], at + done)


def write_when_done(value: Future, fd: int, at: int, tensor_bytes: Callable[..., memoryview]) -> Future:
    """A future that completes once ``value``'s bytes are written at ``at`` (by the thread that computed it, so
    writes of computed tensors overlap each other and the computations); it carries any error of either."""
    written: Future = Future()
    written.set_running_or_notify_cancel()  # not cancellable: the file stays open until it is done

    def write(done: Future) -> None:
        try:
            pwrite_all(fd, tensor_bytes(done.result()), at)
            written.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on ``written``
            written.set_exception(e)

    value.add_done_callback(write)
    return written


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


def _stop(writes: list[Future]) -> None:
    """Cancel what has not started and wait for what has: nothing may write into a descriptor after it closes."""
    for f in writes:
        f.cancel()
    wait(writes)


def _wait_all(writes: list[Future]) -> None:
    """Wait for ``writes``; raise the first failure once nothing of them still runs."""
    try:
        for f in writes:
            f.result()
    except BaseException:
        _stop(writes)
        raise


@dataclass
class _Ahead:
    """A tensor the pool works on: its future value (``None`` for an untouched copy) and what it holds."""

    name: str
    node: Node
    future: Future | None
    cost: int  # counted in flight: value + inputs while computing, the value alone once computed


def largest_task(graph: Graph, names: list[str]) -> int:
    """The largest :func:`task_cost` among the tensors ``names`` that are computed (not copied)."""
    return max((task_cost(graph[n]) for n in names if not is_copy(graph[n])), default=0)


def is_copy(node: Node) -> bool:
    """An untouched safetensors source tensor: its bytes are copied as they are."""
    from surgeon.graph import Load

    return isinstance(node, Load) and node.checkpoint.pickle_state is None


class ShardPipeline:
    """Computes ahead of the writer on a small pool, within ``budget`` bytes, and writes in plan order."""

    def __init__(self, graph: Graph, executor: Executor, *, budget: int, allow_nonfinite: bool,
                 workers: int | None = None):
        self.graph = graph
        self.executor = executor
        self.budget = budget
        self.allow_nonfinite = allow_nonfinite
        self.pool = ThreadPoolExecutor(max_workers=workers or compute_workers(), thread_name_prefix="surgeon")
        self.writing: deque[_Ahead] = deque()  # computed tensors handed to their writes, in order
        self.files: list[tuple[int, list[Future]]] = []  # open output files and the writes going into each
        self.report_lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._abandon_files()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _value(self, name: str, node: Node) -> torch.Tensor | HostArray:
        """``node``'s value, checked; raw storage without torch where the graph allows (casts of sources)."""
        from surgeon.checkpoint import check_finite, check_finite_host
        from surgeon.graph import runs_on_host

        if runs_on_host(node):
            value = self.executor.host_value(node)
            self.executor.release(node)
            shape, dtype = value.shape, value.dtype
        else:
            value = self.executor.value(node)
            self.executor.release(node)
            shape, dtype = tuple(value.shape), str(value.dtype).removeprefix("torch.")
        if tuple(shape) != node.shape or dtype != node.dtype_name:
            raise SurgeonError(f"internal: tensor {name!r} computed as {list(shape)} {dtype}, "
                               f"planned {list(node.shape)} {node.dtype_name}")
        if not self.allow_nonfinite and not node.finite:
            (check_finite_host if isinstance(value, HostArray) else check_finite)(name, value)
        return value

    def _start(self, name: str) -> _Ahead:
        node = self.graph[name]
        if self._piecewise(node):
            return _Ahead(name, node, None, 0)
        cost = task_cost(node)
        self.in_flight += cost
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return _Ahead(name, node, self.pool.submit(self._value, name, node), cost)

    def add_file(self, path: Path, header: bytes, names: list[str], on_tensor: Callable[[int], None]) -> None:
        """Create ``path`` with ``header`` followed by the tensors ``names``, and return once they are all handed
        to the pool: the next file's work starts while this one's copies and writes still run (ext4 serialises
        writers of one file, not of different ones). :meth:`finish` waits for them and closes the files."""
        from surgeon.filemap import preallocate

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            preallocate(fd, len(header) + sum(self.graph[n].nbytes for n in names))
            write_all(fd, header)
            writes = self._hand_over(fd, names, on_tensor)
        except BaseException:
            os.close(fd)
            raise
        self.files.append((fd, writes))

    def finish(self) -> None:
        """Wait for every file's writes (the NaN/Inf checks of copied tensors run inside them); close the files;
        raise the first failure."""
        try:
            while self.files:
                fd, writes = self.files[0]
                _wait_all(writes)
                self.files.pop(0)
                os.close(fd)
        finally:
            self._abandon_files()

    def _abandon_files(self) -> None:
        """After a failure: stop every file's writes (all cancelled first), then close the files."""
        _stop([f for _, writes in self.files for f in writes])
        for fd, _ in self.files:
            os.close(fd)
        self.files.clear()

    def _hand_over(self, fd: int, names: list[str], on_tensor: Callable[[int], None]) -> list[Future]:
        """Start the tensors ``names`` into ``fd`` after its current position (then past them); the futures of
        their writes. On failure, what was started is cancelled or waited for before the error propagates."""
        from surgeon.tensorfile import tensor_bytes

        queue: deque[_Ahead] = deque()
        upcoming = deque(names)
        writes: list[Future] = []  # kernel copies and computed tensors' writes into this file, on the pool
        try:
            self._write_in_order(fd, queue, upcoming, writes, self._reporting(on_tensor), tensor_bytes)
        except BaseException:
            _stop(writes)  # the caller closes the file
            raise
        return writes

    def _reporting(self, on_tensor: Callable[[int], None]) -> Callable[[Future, int], None]:
        """Report ``n`` written bytes to ``on_tensor`` once the write ``future`` has succeeded (pool threads
        call it, one at a time)."""
        def report(future: Future, n: int) -> None:
            def done(f: Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    with self.report_lock:
                        on_tensor(n)
            future.add_done_callback(done)
        return report

    def _write_in_order(self, fd: int, queue: deque[_Ahead], upcoming: deque[str], writes: list[Future],
                        report: Callable[[Future, int], None], tensor_bytes: Callable[..., memoryview]) -> None:
        run = _CopyRun()
        while upcoming or queue:
            self._settle(queue)
            # keep the pool busy: start tensors while the budget allows (at least one when nothing is in flight)
            while upcoming and (self.in_flight + self._cost(upcoming[0]) <= self.budget
                                or not (queue or self.writing)):
                queue.append(self._start(upcoming.popleft()))
            if not queue:  # the budget is held by computed tensors still being written: wait for the oldest
                wait([self.writing[0].future])
                continue
            item = queue.popleft()
            if item.future is None and is_copy(item.node):  # copied on the pool with its untouched neighbours
                info = item.node.checkpoint.tensors[item.node.name]  # type: ignore[attr-defined]
                at = os.lseek(fd, info.nbytes, os.SEEK_CUR) - info.nbytes
                tensor = (item.node.name, item.node.dtype_name, info.nbytes)  # type: ignore[attr-defined]
                if not run.extend(*tensor[:2], info.file, info.begin, info.nbytes, at):
                    self._submit_copy(run, fd, writes, report)
                    run = _CopyRun(info.file, info.begin, info.nbytes, at, [tensor])
                self.executor.release(item.node)
            elif item.future is None:  # computed from a source tensor (a cast, an op's stream) piece by piece
                self._submit_copy(run, fd, writes, report)
                run = _CopyRun()
                self._submit_streamed(item, fd, writes, report)
            else:  # written at its place by the computing thread once done; memory counted until written
                self._submit_copy(run, fd, writes, report)
                run = _CopyRun()
                at = os.lseek(fd, item.node.nbytes, os.SEEK_CUR) - item.node.nbytes
                item.future = write_when_done(item.future, fd, at, tensor_bytes)
                writes.append(item.future)
                report(item.future, item.node.nbytes)
                self.writing.append(item)
        self._submit_copy(run, fd, writes, report)

    def _submit_streamed(self, item: _Ahead, fd: int, writes: list[Future],
                         report: Callable[[Future, int], None]) -> None:
        source = item.node.inputs[-1]
        info = source.checkpoint.tensors[source.name]  # type: ignore[attr-defined]
        at = os.lseek(fd, item.node.nbytes, os.SEEK_CUR) - item.node.nbytes
        run = _CopyRun(info.file, info.begin, info.nbytes, at, [(source.name, source.dtype_name, info.nbytes)])
        check_name = None if self.allow_nonfinite or item.node.finite else item.name
        if streams_cast(item.node):
            future = self.pool.submit(cast_run, run, fd, item.node.dtype_name,
                                      not source.checkpoint.allow_nonfinite, check_name)  # type: ignore[attr-defined]
        else:
            future = self.pool.submit(stream_run, run, fd, item.node.stream_fn, check_name,  # type: ignore[attr-defined]
                                      partial(self._given_values, item.node.inputs[:-1]))
        writes.append(future)
        report(future, item.node.nbytes)
        self.executor.release(item.node)
        self.executor.release(source)

    def _given_values(self, nodes: Sequence[Node]) -> list:
        """The values of a streamed node's small inputs (computed once, shared by every node that takes them),
        each released once read, as a computed node releases its inputs."""
        values = [self.executor.value(n) for n in nodes]
        for n in nodes:
            self.executor.release(n)
        return values

    def _submit_copy(self, run: _CopyRun, fd: int, writes: list[Future],
                     report: Callable[[Future, int], None]) -> None:
        if run.file is None:
            return
        future = self.pool.submit(copy_run, run, fd, not self.allow_nonfinite)
        writes.append(future)
        report(future, run.nbytes)

    def _settle(self, queue: deque[_Ahead]) -> None:
        """Computed tensors no longer hold their inputs: count only their values from now on; written ones
        hold nothing."""
        while self.writing and self.writing[0].future.done():
            done = self.writing.popleft()
            self.in_flight -= done.cost
            done.future.result()  # raises a failed computation or write now
        for item in queue:
            if item.future is not None and item.future.done() and item.cost > item.node.nbytes:
                self.in_flight -= item.cost - item.node.nbytes
                item.cost = item.node.nbytes

    def _piecewise(self, node: Node) -> bool:
        """Written piece by piece by one pool task, checked as it goes, holding no value: an untouched tensor, or
        a streamed cast or op stream that nothing else consumes (else the value is computed once and cached for both)."""
        return is_copy(node) or ((streams_cast(node) or streams_pieces(node))
                                 and self.executor.refs.get(id(node)) == 1)

    def _cost(self, name: str) -> int:
        node = self.graph[name]
        return 0 if self._piecewise(node) else task_cost(node)
