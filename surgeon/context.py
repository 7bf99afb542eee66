"""What an op gets besides its graph and params: device, seed, named input models, data, progress, results.

Ops never open files or print. Data arrives through :meth:`Context.tokens` / :meth:`Context.texts`; side
files through :meth:`Context.read`; cached statistics through :meth:`Context.cache`; resumable state through
:meth:`Context.state`; extra output files through :meth:`Context.attach`; other checkpoints through
:meth:`Context.open_source`. Architecture roles come from :meth:`Context.roles` (the run's ``arch:``
overrides applied). Progress goes through :meth:`Context.progress`, messages through :meth:`Context.log`.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    import torch

    from surgeon.arch import Roles
    from surgeon.checkpoint import Checkpoint
    from surgeon.graph import Graph
    from surgeon.storage import CacheEntry, StateFolder

T = TypeVar("T")

LINE_INTERVAL_S = 30.0  # without a terminal, a long loop logs a progress line at least this often
_clock = time.monotonic  # tests patch this


def _duration(seconds: float) -> str:
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """Progress for logs that are not a terminal (CI, ``nohup``, a pipe): one line at most every
    ``interval`` seconds, with the count done, elapsed time and an ETA from the mean rate so far, e.g.
    ``PERP: 12/100 (12%), 1m05s elapsed, ETA 7m57s, loss 3.210``. ``unit="B"`` shows bytes as MB."""

    def __init__(self, log, description: str, total: float | None, *, interval: float = LINE_INTERVAL_S,
                 unit: str = ""):
        self.log, self.description, self.total, self.interval, self.unit = log, description, total, interval, unit
        self.done = 0.0
        self.text = ""
        self.start = self.last = _clock()

    def _amount(self, x: float) -> str:
        return f"{x / 1e6:.0f} MB" if self.unit == "B" else f"{int(x)}"

    def line(self) -> str:
        elapsed = _clock() - self.start
        head = f"{self.description or 'working'}: {self._amount(self.done)}"
        if self.total:
            head += f"/{self._amount(self.total)} ({100 * self.done / self.total:.0f}%)"
        head += f", {_duration(elapsed)} elapsed"
        if self.total and self.done > 0:
            head += f", ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        elif self.total:
            head += ", ETA unknown"
        return head + (f", {self.text}" if self.text else "")

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = _clock()
        if now - self.last >= self.interval:
            self.last = now
            self.log(self.line())

    def status(self, text: str) -> None:
        self.text = text


def _no_gpu_device_files() -> bool:
    """True on a Linux machine without NVIDIA/AMD/WSL GPU device files, where CUDA cannot be available."""
    from pathlib import Path

    dev = Path("/dev")
    return sys.platform == "linux" and not any(
        (dev / name).exists() for name in ("nvidiactl", "nvidia0", "kfd", "dxg"))


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise SurgeonError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "auto" and "torch" not in sys.modules and _no_gpu_device_files():
        return "cpu"  # what torch would answer, without the 2 s of importing it
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SurgeonError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


@dataclass
class Context:
    """Run-wide settings and services shared by every step of one run."""

    device: str = "cpu"  # resolved: "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    graphs: dict[str, Graph] = field(default_factory=dict)  # named input models (merges)
    base_name: str | None = None
    quiet: bool = False
    allow_nonfinite: bool = False
    step_info: dict[str, Any] = field(default_factory=dict)  # what the current step reports for provenance
    origin: Graph | None = None  # the run's input model before any step changed it (``model:N`` samples it)
    origin_fingerprint: str | None = None  # memo of surgeon.data.sampler_fingerprint(origin)
    arch: dict[str, Any] | None = None  # the run's architecture role overrides (recipe ``arch:``)
    allow_pickle: bool = False
    online: bool = False
    use_cache: bool = True  # False: ctx.cache entries always miss and are not written
    max_memory: str | int | None = None  # --max-memory: the model engine's budget (one block must fit)
    work_dir: str | None = None  # where model-level ops spill changed tensors (next to the output); None: a tempdir
    _console: Any = None

    @classmethod
    def create(cls, device: str = "auto", **kw: Any) -> Context:
        return cls(device=resolve_device(device), **kw)

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    # reporting -------------------------------------------------------------------------------------------
    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            # soft_wrap: a log line stays one line in a log file (rich would cut it at 80 columns off a terminal)
            self._console = Console(stderr=True, quiet=self.quiet, soft_wrap=True)
        return self._console

    def log(self, message: str) -> None:
        """A line for the user on stderr (never stdout, which carries --json)."""
        self.console.print(message, highlight=False)

    def progress(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Wrap a loop in progress on stderr: a rich bar on a terminal; otherwise a :class:`LineProgress` line
        at least every 30 s (count, elapsed, ETA, the last :meth:`status`); nothing when quiet."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        if self.quiet:
            yield from items
            return
        if not sys.stderr.isatty():
            lines = LineProgress(self.log, description, total)
            self._lines = lines
            try:
                for item in items:
                    yield item
                    lines.advance()
            finally:
                self._lines = None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total, status="")
            self._bar = (bar, task)
            try:
                for item in items:
                    yield item
                    bar.advance(task)
            finally:
                self._bar = None

    def status(self, text: str) -> None:
        """Update the trailing text of the current progress bar (e.g. the loss)."""
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar[0].update(bar[1], status=text)
        lines = getattr(self, "_lines", None)
        if lines is not None:
            lines.status(text)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.step_info.setdefault("timings_s", {})[what] = round(time.perf_counter() - t0, 3)

    def report(self, **info: Any) -> None:
        """Record facts about the current step (go into surgeon.json and the card)."""
        self.step_info.update(info)

    # models and data ------------------------------------------------------------------------------------
    def graph(self, name: str) -> Graph:
        if name not in self.graphs:
            raise SurgeonError(f"no input model named {name!r} (have: {', '.join(self.graphs) or 'none'})")
        return self.graphs[name]

    def module(self, graph: Graph, *, dtype: str = "float32", kind: str = "causal-lm", component: str = ""):
        """Materialise ``graph`` as a torch module on this context's device (see :mod:`surgeon.model`)."""
        from surgeon.model import materialize

        return materialize(graph, device=self.device, dtype=dtype, kind=kind, component=component,
                           check_finite=not self.allow_nonfinite)

    def tokenizer(self, graph: Graph, component: str = ""):
        from surgeon.model import load_tokenizer

        return load_tokenizer(graph, component=component)

    def texts(self, spec: str, *, graph: Graph | None = None, n_samples: int = 64, field: str = "text",
              sample_len: int = 128) -> list[str]:
        """Texts from a file (.txt/.jsonl/datasets folder) or ``model[:N]`` samples of ``graph`` itself."""
        from surgeon.data import load_texts

        return load_texts(spec, graph=graph, ctx=self, n_samples=n_samples, field=field, sample_len=sample_len)

    def tokens(self, spec: str, graph: Graph, *, seqlen: int = 512, max_windows: int | None = None,
               field: str = "text", n_samples: int = 64) -> torch.Tensor:
        """Token windows ``[n, seqlen]`` (packed, deterministic) from ``spec`` with ``graph``'s tokenizer."""
        from surgeon.data import token_windows

        return token_windows(spec, graph, ctx=self, seqlen=seqlen, max_windows=max_windows, field=field,
                             n_samples=n_samples)

    # run-level settings ------------------------------------------------------------------------------------
    def roles(self, graph: Graph, *, component: str = "", overrides: dict[str, Any] | None = None) -> Roles:
        """The architecture roles of ``graph`` (see :mod:`surgeon.arch`) with the run's ``arch:`` overrides,
        and an op's own ``overrides`` over those."""
        from surgeon.arch import roles_for

        merged = {**(self.arch or {}), **(overrides or {})} or None
        cfg = graph.configs.get(component, {}) if component else graph.config
        names = graph.names()
        if component:
            names = [n[len(component) + 1:] for n in names if n.startswith(component + "/")] or names
        return roles_for(cfg, names, merged)

    def seed_for(self, offset: int = 0) -> int:
        """The run's seed shifted by an op's own ``offset`` (ops never replace the run's seed)."""
        return self.seed + offset

    # files, on the op's behalf -----------------------------------------------------------------------------
    def read(self, path: str, *, what: str) -> bytes:
        """The bytes of a side file the user named; ``what`` names the option (``--requests``)."""
        from surgeon.storage import read_side_file

        return read_side_file(path, what=what)

    def read_text(self, path: str, *, what: str) -> str:
        data = self.read(path, what=what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise SurgeonError(f"{what}: {path} is not UTF-8 text") from None

    def read_json(self, path: str, *, what: str) -> Any:
        from surgeon.storage import decode_json

        return decode_json(self.read(path, what=what), where=f"{what}: {path}")

    def fingerprint(self, path: str, *, what: str) -> str | None:
        """sha256 of the content of a side file or folder (for cache keys); ``None`` when ``path`` names no
        file or folder (a spec such as ``model:N``)."""
        from surgeon.storage import content_fingerprint

        try:
            return content_fingerprint(path)
        except OSError as e:
            raise SurgeonError(f"{what}: cannot read {path} ({e.strerror or e})") from None

    def tokenizer_from(self, folder: str | None, *, cls: str = "AutoTokenizer", hub_repo: str | None = None,
                       what: str) -> Any:
        """A transformers tokenizer of class ``cls`` from a tokenizer ``folder``, or (``folder`` None) from
        ``hub_repo`` in the local Hub cache only (never downloaded): ``None`` when that repo is not cached."""
        from surgeon.storage import hub_cached_folder, load_tokenizer_folder

        if folder is None:
            found = hub_cached_folder(hub_repo, "vocab.json") if hub_repo else None
            if found is None:
                return None
            folder = str(found)
        return load_tokenizer_folder(folder, cls=cls, what=what)

    def open_source(self, source: str) -> Checkpoint:
        """Another checkpoint (folder, file, repo id, GGUF, builtin) opened read-only and lazily."""
        from surgeon.sources import open_checkpoint

        return open_checkpoint(source, allow_pickle=self.allow_pickle, online=self.online,
                               allow_nonfinite=self.allow_nonfinite)

    def cache(self, namespace: str, key: str) -> CacheEntry:
        """A cache entry under ``$SURGEON_CACHE/<namespace>/<key>.safetensors`` (statistics, projectors)."""
        from surgeon.storage import cache_entry

        return cache_entry(namespace, key, enabled=self.use_cache)

    def state(self, folder: str | None, *, what: str) -> StateFolder:
        """Resumable state: the user's ``folder`` (kept), or a temporary one removed when unused."""
        from surgeon.storage import StateFolder

        return StateFolder(folder, what=what)

    def attach(self, graph: Graph, name: str, data: str | bytes | dict[str, torch.Tensor], *,
               metadata: dict[str, str] | None = None) -> None:
        """Add an extra output file to ``graph`` (a report, an undo file): text, bytes, or tensors (stored as a
        deterministic safetensors file with ``metadata``)."""
        if isinstance(data, dict):
            from surgeon.tensorfile import safetensors_bytes

            data = safetensors_bytes(data, metadata)
        graph.extra_files[name] = data

