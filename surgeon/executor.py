"""The local executor: writes a graph's planned shards as a pipeline bounded by a memory budget.

Tensor-wise work is I/O bound, so the writer keeps the disk busy while everything else happens beside it:
- **Computed tensors** are computed ahead, in shard order, on a small thread pool (reading their sources is the
  read-ahead: ``os.preadv`` and torch kernels release the GIL), while the writer thread writes finished ones in
  order. What is in flight (computed, not yet written) never exceeds the memory budget, so peak memory is the
  budget plus one tensor, whatever the model size.
- **Untouched tensors** are copied by the kernel (``os.copy_file_range``, falling back to ``os.sendfile`` and
  then to read/write), never through Python buffers, on the pool and straight into their planned place in the
  file, so several copies (and computations) run at once while the writer goes on.
- **Finiteness checks** of untouched source bytes (on unless ``--allow-nonfinite``) read the source in chunks on
  the pool, off the write path; a failure is raised before the output folder is renamed into place.

The bytes written are exactly those of the plain one-tensor-at-a-time order (the header is planned from shapes
and dtypes; each tensor goes to its planned offset).
"""
from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError
from surgeon.tensorfile import FLOAT_DTYPES, HostArray, dtype_width

if TYPE_CHECKING:
    import torch

    from surgeon.graph import Executor, Graph, Node

CHECK_CHUNK = 64 << 20  # bytes of source data per finiteness-check read
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
# kernel-side copies


def copy_range(src: Path, offset: int, count: int, dst_fd: int, dst_offset: int | None = None) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst_fd``, kernel-side: appended at its current
    position, or at ``dst_offset`` (then several copies into one file may run at once)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        done = 0
        while done < count:
            at = None if dst_offset is None else dst_offset + done
            n = _copy_step(fd, dst_fd, offset + done, count - done, at)
            if n <= 0:
                raise SurgeonError(f"{src}: file ends at byte {offset + done}, expected {offset + count} bytes")
            done += n
    finally:
        os.close(fd)


_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _copy_step(src_fd: int, dst_fd: int, offset: int, count: int, dst_offset: int | None) -> int:
    step = min(count, 1 << 30)
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src_fd, dst_fd, step, offset, dst_offset)
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise
    if dst_offset is None:  # sendfile writes at the file position
        try:
            return os.sendfile(dst_fd, src_fd, offset, step)
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise
    data = os.pread(src_fd, min(step, CHECK_CHUNK), offset)
    if dst_offset is None:
        write_all(dst_fd, data)
    else:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(dst_fd, view, dst_offset + len(data) - len(view)):]
    return len(data)


def write_all(fd: int, data: memoryview | bytes) -> None:
    """``os.write`` until every byte is written (a single call may write less)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data: memoryview | bytes, at: int) -> None:
    """``os.pwrite`` at offset ``at`` until every byte is written (the file position does not move)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], at + done)


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


def check_source_finite(node: Node) -> None:
    """NaN/Inf refusal for an untouched source tensor, read in chunks (the copy itself never passes through us)."""
    from surgeon.checkpoint import check_finite_host, source_bytes
    from surgeon.kernels.host_dtypes import STORAGE

    info = node.checkpoint.tensors[node.name]  # type: ignore[attr-defined]
    elem = dtype_width(node.dtype_name)
    chunk = max(elem, (CHECK_CHUNK // elem) * elem)
    for done in range(0, info.nbytes, chunk):
        raw = source_bytes(info, done, min(chunk, info.nbytes - done))
        check_finite_host(node.name, HostArray(raw.view(STORAGE[node.dtype_name]), node.dtype_name, (-1,)))
        del raw  # unmapped before the next chunk is mapped


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


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
        self.checks: deque[Future] = deque()
        self.writing: deque[_Ahead] = deque()  # computed tensors handed to their writes, in order
        self.in_flight = 0
        self.peak_in_flight = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
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
        if is_copy(node):
            if not self.allow_nonfinite and node.dtype_name in FLOAT_DTYPES:
                self.checks.append(self.pool.submit(check_source_finite, node))
            return _Ahead(name, node, None, 0)
        cost = task_cost(node)
        self.in_flight += cost
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return _Ahead(name, node, self.pool.submit(self._value, name, node), cost)

    def write(self, fd: int, names: list[str], on_tensor: Callable[[int], None]) -> None:
        """Append the tensors ``names`` (one shard's, in order) to the open file ``fd``, computing ahead."""
        from surgeon.writer import tensor_bytes  # via the writer at call time: a test patches it there

        queue: deque[_Ahead] = deque()
        upcoming = deque(names)
        copies: list[Future] = []  # kernel copies into this file, running on the pool
        try:
            self._write_in_order(fd, queue, upcoming, copies, on_tensor, tensor_bytes)
        except BaseException:
            for f in copies:
                f.cancel()
            wait(copies)  # the caller closes the file: nothing may still write into it
            raise
        for f in copies:
            f.result()

    def _write_in_order(self, fd: int, queue: deque[_Ahead], upcoming: deque[str], copies: list[Future],
                        on_tensor: Callable[[int], None], tensor_bytes: Callable[..., memoryview]) -> None:
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
            if item.future is None:  # copied by the kernel on the pool, into its place, while we go on
                info = item.node.checkpoint.tensors[item.node.name]  # type: ignore[attr-defined]
                at = os.lseek(fd, info.nbytes, os.SEEK_CUR) - info.nbytes
                copies.append(self.pool.submit(copy_range, info.file, info.begin, info.nbytes, fd, at))
                self.executor.release(item.node)
            else:  # written at its place by the computing thread once done; memory counted until written
                at = os.lseek(fd, item.node.nbytes, os.SEEK_CUR) - item.node.nbytes
                item.future = write_when_done(item.future, fd, at, tensor_bytes)
                copies.append(item.future)
                self.writing.append(item)
            self._raise_failed_checks()
            on_tensor(item.node.nbytes)

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

    def _cost(self, name: str) -> int:
        node = self.graph[name]
        return 0 if is_copy(node) else task_cost(node)

    def _raise_failed_checks(self) -> None:
        while self.checks and self.checks[0].done():
            self.checks.popleft().result()

    def finish_checks(self) -> None:
        """Wait for the finiteness checks of copied tensors; raise the first failure."""
        while self.checks:
            self.checks.popleft().result()
