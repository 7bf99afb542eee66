"""Streaming, atomic, Hub-ready checkpoint writer.

Every shard header is computed from node shapes/dtypes before any tensor exists; tensors are then computed one
at a time in shard order and streamed into place, so peak memory is a few tensors. Untouched tensors are copied
byte-for-byte. Everything goes into ``OUT.tmp-*`` and is renamed to ``OUT`` at the end; on any error or Ctrl-C
the temporary folder is removed and ``OUT`` is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError
from surgeon.graph import Executor, Graph, Node
from surgeon.outputs import (
    AUTO_SHARD_SIZE,
    check_output_location,
    parse_shard_size,
    refuse_to_replace,
)
from surgeon.tensorfile import (  # noqa: F401 (tensor_bytes, safetensors_bytes re-exported)
    FLOAT_DTYPES,
    TORCH_TO_SAFETENSORS,
    header_bytes,
    safetensors_bytes,
    tensor_bytes,
)

if TYPE_CHECKING:
    from surgeon.context import Context
    from surgeon.executor import ShardPipeline

DEFAULT_MAX_SHARD = 5_000_000_000


@dataclass
class ShardPlan:
    component: str
    file: str
    names: list[str]
    nbytes: int


def component_of(graph: Graph, name: str) -> tuple[str, str]:
    """``unet/down...`` -> ("unet", "down...") when ``unet`` is a component of the graph."""
    head, sep, rest = name.partition("/")
    if sep and head in graph.weight_stems and head != "":
        return head, rest
    return "", name


def input_shard_size(graph: Graph) -> int | None:
    """The largest safetensors file of the graph's sharded sources (a folder whose tensors span several files),
    or None when no source is sharded."""
    files: dict[Path, set[Path]] = {}
    for ck in graph.sources:
        if ck.pickle_state is None:
            for info in ck.tensors.values():
                files.setdefault(info.file.parent, set()).add(info.file)
    sizes = [f.stat().st_size for group in files.values() if len(group) > 1 for f in group]
    return max(sizes, default=None)


def shard_size_for(graph: Graph, max_shard_size: str | int) -> int:
    """``--max-shard-size`` in bytes; ``auto`` keeps a sharded input's shard size (at most 5 GB, the Hub's
    convention), else 5 GB. Shards like the input's also write faster: several files are written at once."""
    size = parse_shard_size(max_shard_size)
    if size is not None:
        return size
    return min(DEFAULT_MAX_SHARD, input_shard_size(graph) or DEFAULT_MAX_SHARD)


def plan_shards(graph: Graph, max_shard_size: int) -> list[ShardPlan]:
    by_comp: dict[str, list[str]] = {}
    for name in graph.names():
        comp, _ = component_of(graph, name)
        by_comp.setdefault(comp, []).append(name)
    plans: list[ShardPlan] = []
    for comp, names in by_comp.items():
        stem = graph.weight_stems.get(comp, "model")
        groups: list[list[str]] = [[]]
        sizes = [0]
        for n in names:
            b = graph[n].nbytes
            if groups[-1] and sizes[-1] + b > max_shard_size:
                groups.append([])
                sizes.append(0)
            groups[-1].append(n)
            sizes[-1] += b
        total = len(groups)
        for k, (g, s) in enumerate(zip(groups, sizes), start=1):
            file = f"{stem}.safetensors" if total == 1 else f"{stem}-{k:05d}-of-{total:05d}.safetensors"
            plans.append(ShardPlan(comp, f"{comp}/{file}" if comp else file, g, s))
    return plans


def _header(graph: Graph, plan: ShardPlan) -> tuple[bytes, list[tuple[str, int]]]:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    spans = []
    for n in plan.names:
        node = graph[n]
        if node.dtype_name not in TORCH_TO_SAFETENSORS:
            raise SurgeonError(f"tensor {n!r}: dtype {node.dtype_name} cannot be stored in safetensors")
        size = node.nbytes
        _, local = component_of(graph, n)
        entries[local] = {"dtype": TORCH_TO_SAFETENSORS[node.dtype_name],
                          "shape": list(node.shape), "data_offsets": [offset, offset + size]}
        spans.append((n, size))
        offset += size
    return header_bytes(entries), spans


def write_shard_file(graph: Graph, plan: ShardPlan, path: Path, *, pipeline: ShardPipeline | None = None,
                     budget: int | None = None, allow_nonfinite: bool = False,
                     on_tensor: Callable[[int], None] | None = None) -> None:
    """Write one planned shard (header, then its tensors in order) to ``path``, with ``pipeline`` or a new one."""
    from surgeon.executor import ShardPipeline, largest_task, memory_budget

    path.parent.mkdir(parents=True, exist_ok=True)
    header, _ = _header(graph, plan)
    report = on_tensor or (lambda n: None)
    if pipeline is not None:  # the pipeline closes the file once its writes are done (``finish``)
        pipeline.add_file(path, header, plan.names, report)
        return
    with ShardPipeline(graph, Executor([graph[n] for n in plan.names]), allow_nonfinite=allow_nonfinite,
                       budget=budget or memory_budget(None, largest_task(graph, plan.names))) as own:
        own.add_file(path, header, plan.names, report)
        own.finish()


def _dominant_float_dtype(graph: Graph, comp: str) -> str | None:
    counts: dict[str, int] = {}
    for n in graph.names():
        if component_of(graph, n)[0] != comp:
            continue
        node = graph[n]
        if node.dtype_name in FLOAT_DTYPES:
            counts[node.dtype_name] = counts.get(node.dtype_name, 0) + node.nbytes
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove ``OUT.tmp-<host>-<pid>-*`` folders left by a writer on this host that no longer runs (killed with
    SIGKILL, power loss): only this host's tag and only dead pids, so concurrent writers are never touched."""
    import glob
    import re

    pattern = re.compile(rf"{re.escape(out.name)}\.tmp-{_host_tag()}-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for p in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        m = pattern.fullmatch(p.name)
        if m is not None and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out`` on success, remove it on any failure.

    The temporary name carries this host's tag and pid, so a later write removes what a killed writer left.
    """
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp = out.parent / f"{out.name}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise SurgeonError(f"output {out}: cannot create the folder ({e.strerror or e})") from None
    try:
        yield tmp
        if out.exists():
            refuse_to_replace(out, force)
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SurgeonError(f"output {out}: no space left on device (temporary files removed)") from None
        if e.errno == errno.EFBIG:
            raise SurgeonError(f"output {out}: file size limit exceeded (ulimit -f / file system limit; "
                               "temporary files removed; a smaller --max-shard-size may help)") from None
        raise SurgeonError(f"output {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_graph(graph: Graph, out: str | os.PathLike, *, ctx: Context | None = None, force: bool = False,
                max_shard_size: str | int = AUTO_SHARD_SIZE, allow_nonfinite: bool = False,
                provenance: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                max_memory: str | int | None = None, workers: int | None = None,
                executor: str = "local", record_paths: bool = False) -> dict[str, Any]:
    """Write ``graph`` as a Hub-ready folder at ``out``. Returns a summary (files, bytes, seconds).

    ``executor="local"``: shards are written by :class:`surgeon.executor.ShardPipeline` (compute ahead within
    ``max_memory``, untouched tensors written from a map of their source with their NaN/Inf check in the same
    pass, shard files at once). ``max_shard_size``: bytes, a size string, or ``auto`` (:func:`shard_size_for`).
    ``executor="ray"``: one task per shard on a Ray cluster (:mod:`surgeon.ray_executor`).
    Local paths (inputs, data files, the output) appear by name only in the card, and in ``surgeon.json`` unless
    ``record_paths``; the returned summary keeps the full output path."""
    from surgeon.card import render_card, without_local_paths
    from surgeon.executor import ShardPipeline, largest_task, memory_budget

    out = Path(out)
    check_output_location(out, [s.path for s in graph.sources], force)
    plans = plan_shards(graph, shard_size_for(graph, max_shard_size))
    budget = memory_budget(max_memory, largest_task(graph, graph.names()))
    total = sum(p.nbytes for p in plans)
    t0 = time.perf_counter()
    with atomic_folder(out, force) as tmp:
        progress = _Progress(ctx, total)
        if executor == "ray":
            from surgeon.ray_executor import write_shards_on_ray

            write_shards_on_ray(graph, plans, tmp, budget=budget, allow_nonfinite=allow_nonfinite,
                                on_shard=progress.advance)
        elif executor == "local":
            with ShardPipeline(graph, Executor([graph[n] for p in plans for n in p.names]), budget=budget,
                               workers=workers, allow_nonfinite=allow_nonfinite) as pipeline:
                for plan in plans:
                    write_shard_file(graph, plan, tmp / plan.file, pipeline=pipeline, on_tensor=progress.advance)
                pipeline.finish()
        else:
            raise SurgeonError(f"--executor: expected local or ray, got {executor!r}")
        written = [p.file for p in plans]
        progress.close()
        _write_indexes(graph, plans, tmp)
        _write_configs(graph, tmp)
        for rel, src in graph.side_files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        for rel, content in graph.extra_files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content if isinstance(content, bytes) else content.encode())
        seconds = time.perf_counter() - t0
        summary = {"output": str(Path(out).resolve()), "files": written, "total_bytes": total,
                   "tensors": len(graph), "write_seconds": round(seconds, 3)}
        prov = dict(provenance or {})
        prov.setdefault("outputs", summary)
        prov = json.loads(json.dumps(prov, default=str))
        if not record_paths:
            prov = without_local_paths(prov)
        (tmp / "surgeon.json").write_text(json.dumps(prov, indent=2) + "\n")
        (tmp / "README.md").write_text(render_card(graph, recipe=recipe, provenance=prov))
    return summary


def _write_indexes(graph: Graph, plans: list[ShardPlan], tmp: Path) -> None:
    by_comp: dict[str, list[ShardPlan]] = {}
    for p in plans:
        by_comp.setdefault(p.component, []).append(p)
    for comp, ps in by_comp.items():
        if len(ps) == 1:
            continue
        weight_map = {}
        for p in ps:
            for n in p.names:
                weight_map[component_of(graph, n)[1]] = Path(p.file).name
        params = sum(graph[n].nbytes and _numel(graph[n]) for p in ps for n in p.names)
        index = {"metadata": {"total_size": sum(p.nbytes for p in ps), "total_parameters": params},
                 "weight_map": dict(sorted(weight_map.items()))}
        stem = graph.weight_stems.get(comp, "model")
        dest = (tmp / comp if comp else tmp) / f"{stem}.safetensors.index.json"
        dest.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _numel(node: Node) -> int:
    n = 1
    for s in node.shape:
        n *= s
    return n


def _write_configs(graph: Graph, tmp: Path) -> None:
    for comp, cfg in graph.configs.items():
        if not cfg:
            continue
        cfg = dict(cfg)
        dt = _dominant_float_dtype(graph, comp)
        if dt is not None and comp == "" and ("torch_dtype" in cfg or "dtype" in cfg or "model_type" in cfg):
            key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
            cfg[key] = dt
        if comp == "":
            from surgeon.formats.model_types import to_disk

            cfg = to_disk(cfg)  # packed / compact layouts get a surgeon model type (see surgeon.formats)
        dest = (tmp / comp if comp else tmp) / "config.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


class _Progress:
    """A byte-based progress bar on stderr while shards are written (a line every 30 s without a terminal)."""

    def __init__(self, ctx: Context | None, total: int):
        self.bar = None
        self.lines = None
        if ctx is None or ctx.quiet:
            return
        if not os.isatty(2):
            from surgeon.context import LineProgress

            self.lines = LineProgress(ctx.log, "writing", total, unit="B")
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.bar = Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            console=ctx.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("write", total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif self.lines is not None:
            self.lines.advance(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
