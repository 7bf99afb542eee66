"""The pipelined local executor writes exactly the bytes of the plain one-tensor-at-a-time writer."""
from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgeon.errors import SurgeonError
from surgeon.executor import WRITE_CHUNK, ShardPipeline, _CopyRun, copy_run, memory_budget
from surgeon.graph import Apply, Cast, Const, Executor, Graph, Load, LowRank, Reduce
from surgeon.sources import open_checkpoint
from surgeon.writer import _header, plan_shards, write_graph


def _source(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_file({f"layers.{i}.w": torch.randn(64, 48 + i, generator=g) for i in range(6)}
              | {"embed": torch.randn(100, 32, generator=g).to(torch.bfloat16), "ids": torch.arange(7)},
              src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return src


def _mixed_graph(src: Path) -> Graph:
    """Untouched, renamed, cast, shared-input, low-rank, constant and reduction nodes in one graph; casts of
    source tensors run on the host (numpy), also where a torch node consumes them or shares their input."""
    graph = Graph.from_checkpoint(open_checkpoint(str(src)))
    nodes = graph.nodes
    shared = nodes["layers.1.w"]
    nodes["layers.0.w"] = Apply(lambda w: w.half(), [nodes["layers.0.w"]], label="cast", dtype=torch.float16)
    nodes["layers.1.w"] = Apply(lambda w: w * 2, [shared], label="scale")
    nodes["twice"] = Apply(lambda a, b: a + b[:, :49], [shared, nodes["layers.2.w"]], label="sum",
                           shape=shared.shape)
    nodes["layers.3.w"] = LowRank(nodes["layers.3.w"], torch.ones(64, 2), torch.ones(2, 51))
    norm = Reduce([nodes[f"layers.{i}.w"] for i in (4, 5)], init=lambda: torch.zeros(()),
                  step=lambda acc, v, i: acc + v.float().square().sum(), finish=lambda acc: acc.sqrt().reshape(1),
                  shape=(1,), dtype=torch.float32, label="norm")
    nodes["norm"] = norm
    nodes["layers.4.w"] = Apply(lambda w, n: w / n, [nodes["layers.4.w"], norm], label="normalised")
    nodes["renamed"] = Load(graph.sources[0], "embed")
    nodes["const"] = Const(torch.linspace(0, 1, 9))
    embed_f16 = Cast(nodes["embed"], "float16")
    nodes["embed.f16"] = embed_f16  # a host cast whose source tensor is also written untouched
    nodes["embed.f16.plus"] = Apply(lambda e: e + 1, [embed_f16], label="plus")  # host value -> torch consumer
    nodes["layers.5.w"] = Cast(Cast(nodes["layers.5.w"], torch.float64), "bfloat16")  # a host chain
    nodes["twice.bf16"] = Cast(nodes["twice"], "bfloat16")  # a cast of a torch value runs in torch
    return graph


def _plain_write(graph: Graph, folder: Path, max_shard: int) -> None:
    """Reference: the plain writer, one tensor at a time in plan order, every value computed in this thread."""
    folder.mkdir()
    plans = plan_shards(graph, max_shard)
    executor = Executor([graph[n] for p in plans for n in p.names])
    for plan in plans:
        header, _ = _header(graph, plan)
        with open(folder / plan.file, "wb") as fh:
            fh.write(header)
            for name in plan.names:
                value = executor.value(graph[name]).contiguous()
                executor.release(graph[name])
                fh.write(value.view(torch.uint8).reshape(-1).numpy().tobytes())


@pytest.mark.parametrize(("workers", "max_memory"), [(1, "256MiB"), (3, "256MiB"), (4, "8GiB")])
@pytest.mark.parametrize("max_shard", [10_000, 5_000_000_000])
def test_pipelined_shards_equal_plain_writer_bytes(tmp_path, workers, max_memory, max_shard):
    src = _source(tmp_path)
    _plain_write(_mixed_graph(src), tmp_path / "plain", max_shard)
    write_graph(_mixed_graph(src), tmp_path / "piped", max_shard_size=max_shard, max_memory=max_memory,
                workers=workers)
    plain = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert plain == sorted(p.name for p in (tmp_path / "piped").glob("*.safetensors"))
    assert len(plain) == (1 if max_shard > 1e6 else len(plain)) and plain
    for name in plain:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "piped" / name).read_bytes(), name


def test_in_flight_bytes_stay_within_the_budget(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({f"w{i}": torch.randn(256, 256) for i in range(12)}, src / "model.safetensors")
    graph = Graph.from_checkpoint(open_checkpoint(str(src)))
    for name in graph.names():
        graph.nodes[name] = Apply(lambda w: w + 1, [graph.nodes[name]], label="plus")
    cost = 2 * 256 * 256 * 4  # output + input of one tensor
    plan = plan_shards(graph, 5_000_000_000)[0]
    executor = Executor([graph[n] for n in plan.names])
    with ShardPipeline(graph, executor, budget=3 * cost, workers=4, allow_nonfinite=False) as pipe:
        pipe.add_file(tmp_path / "out.bin", b"", plan.names, lambda n: None)
        pipe.finish()
    assert 2 * cost <= pipe.peak_in_flight <= 3 * cost  # it does read ahead, and never past the budget


def test_nan_in_an_untouched_tensor_is_refused_although_copied_by_the_kernel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = torch.randn(300, 300)
    bad[299, 299] = float("nan")
    save_file({"a": torch.randn(10, 10), "bad": bad}, src / "model.safetensors")
    graph = Graph.from_checkpoint(open_checkpoint(str(src), allow_nonfinite=True))
    with pytest.raises(SurgeonError, match="'bad' contains NaN or Inf"):
        write_graph(graph, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    write_graph(graph, tmp_path / "out", allow_nonfinite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes()[-4:] == bad[299, 299:].numpy().tobytes()


def _run_of(path: Path, tensors: list[tuple[str, str, int]], begin: int = 0, at: int = 0) -> _CopyRun:
    return _CopyRun(path, begin, sum(n for _, _, n in tensors), at, list(tensors))


@pytest.mark.parametrize("mappable", [True, False])
def test_copy_run_writes_the_source_range_at_its_place(tmp_path, monkeypatch, mappable):
    """Bytes only (no check): odd sizes and offsets, pieces across the write chunk, read instead of mapped where
    the system refuses a map."""
    if not mappable:
        monkeypatch.setattr("surgeon.filemap.map_bytes", lambda *a: None)
    data = os.urandom(3 * WRITE_CHUNK + 12345)
    (tmp_path / "src.bin").write_bytes(data)
    sizes = [7, WRITE_CHUNK + 1, 3, 2 * WRITE_CHUNK - 2000]
    run = _run_of(tmp_path / "src.bin", [(f"t{i}", "uint8", n) for i, n in enumerate(sizes)], begin=1001, at=5)
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b"head!")
        copy_run(run, fd, check=True)
    finally:
        os.close(fd)
    assert (tmp_path / "dst.bin").read_bytes() == b"head!" + data[1001:1001 + sum(sizes)]


@pytest.mark.parametrize("mappable", [True, False])
@pytest.mark.parametrize(("dtype", "where"), [("float32", "first"), ("float32", "chunk_end"), ("bfloat16", "last"),
                                              ("float16", "chunk_start"), ("float64", "last")])
def test_copy_run_refuses_a_nonfinite_value_anywhere_in_a_float_tensor(tmp_path, monkeypatch, mappable, dtype,
                                                                        where):
    """The check is cut into pieces at element boundaries: a NaN/Inf is found at either side of a piece edge,
    also when the tensor starts at an odd offset (after an int8 tensor of odd length); it names the tensor."""
    if not mappable:
        monkeypatch.setattr("surgeon.filemap.map_bytes", lambda *a: None)
    torch_dtype = getattr(torch, dtype)
    width = torch.finfo(torch_dtype).bits // 8
    n = (WRITE_CHUNK // width) * 2 + 3
    values = torch.randn(n).to(torch_dtype)
    at = {"first": 0, "last": n - 1, "chunk_end": WRITE_CHUNK // width - 1, "chunk_start": WRITE_CHUNK // width}
    values[at[where]] = float("inf") if where == "chunk_start" else float("nan")
    prefix = bytes(range(7))
    (tmp_path / "src.bin").write_bytes(prefix + values.view(torch.uint8).numpy().tobytes())
    tensors = [("ids", "int8", len(prefix)), ("w", dtype, n * width)]
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with pytest.raises(SurgeonError, match="tensor 'w' contains NaN or Inf"):
            copy_run(_run_of(tmp_path / "src.bin", tensors), fd, check=True)
        copy_run(_run_of(tmp_path / "src.bin", tensors), fd, check=False)  # --allow-nonfinite: copied as is
    finally:
        os.close(fd)
    assert (tmp_path / "dst.bin").read_bytes() == (tmp_path / "src.bin").read_bytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_streamed_cast_of_a_source_gives_torchs_bytes_and_refuses_overflow(tmp_path, dtype):
    """A cast of an untouched tensor is converted a piece at a time (several pieces here, an odd element count):
    the bytes are torch's ``.to``; a float32 value past the target's range becomes Inf, which is refused
    (naming the output tensor) unless --allow-nonfinite, as the whole-tensor cast did."""
    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(3 * WRITE_CHUNK // 4 + 5) * 100
    w[-1] = torch.finfo(torch.float32).max  # rounds up to Inf in bfloat16 and float16
    save_file({"a": torch.arange(3, dtype=torch.int8), "w": w}, src / "model.safetensors")
    graph = Graph.from_checkpoint(open_checkpoint(str(src)))
    graph.nodes["w.cast"] = Cast(graph.nodes.pop("w"), dtype)
    if dtype != "float64":
        with pytest.raises(SurgeonError, match="tensor 'w.cast' contains NaN or Inf"):
            write_graph(graph, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    write_graph(graph, tmp_path / "out", allow_nonfinite=True)
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as fh:
        got = fh.get_tensor("w.cast")
    assert got.dtype == getattr(torch, dtype)
    assert got.view(torch.uint8).numpy().tobytes() == w.to(getattr(torch, dtype)).view(torch.uint8).numpy().tobytes()


def test_truncated_source_is_named(tmp_path):
    (tmp_path / "src.bin").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(SurgeonError, match="src.bin: file ends at byte 100, expected 150 bytes"):
            copy_run(_run_of(tmp_path / "src.bin", [("t", "uint8", 100)], begin=50), fd, check=False)
    finally:
        os.close(fd)


def test_a_full_disk_is_found_before_any_tensor_is_written(tmp_path, monkeypatch):
    """Each shard file is reserved to its size first: no room means the clear error, and nothing is left."""
    import ctypes

    from surgeon import filemap

    class NoRoom:
        def __getattr__(self, name):
            return getattr(filemap._libc(), name)

        @staticmethod
        def fallocate(fd, mode, offset, length):
            ctypes.set_errno(errno.ENOSPC)
            return -1

    monkeypatch.setattr(filemap, "_LIBC", NoRoom())
    written = []
    monkeypatch.setattr("surgeon.executor.copy_run", lambda *a: written.append(a))
    with pytest.raises(SurgeonError, match="no space left on device"):
        write_graph(Graph.from_checkpoint(open_checkpoint(str(_source(tmp_path)))), tmp_path / "out")
    assert not written and not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_shared_node_is_computed_once_across_threads():
    calls = []
    gate = threading.Barrier(4)
    base = Const(torch.ones(3))

    def slow(x):
        calls.append(1)
        return x * 3

    shared = Apply(slow, [base], label="shared")
    outs = [Apply(lambda x, k=k: x + k, [shared], label=f"out{k}") for k in range(4)]
    executor = Executor(outs)
    results = {}

    def run(k):
        gate.wait()
        results[k] = executor.value(outs[k])
        executor.release(outs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and executor.live == 0
    assert all(torch.equal(results[k], torch.full((3,), 3.0 + k)) for k in range(4))


def test_max_memory_is_parsed_and_checked():
    assert memory_budget("1GiB") == 1 << 30
    assert memory_budget(None) >= 256 << 20
    with pytest.raises(SurgeonError, match="--max-memory: expected a size"):
        memory_budget("lots")
    with pytest.raises(SurgeonError, match="--max-memory: .* below the minimum"):
        memory_budget("1MB")


def test_dry_run_shows_the_executor_its_tasks_and_their_memory(tmp_path, capsys):
    from surgeon.cli import main

    src = _source(tmp_path)
    argv = ["cast", str(src), "--dtype", "bfloat16", "-o", str(tmp_path / "o"), "--dry-run", "--json",
            "--max-shard-size", "20KB"]
    assert main([*argv, "--executor", "ray"]) == 0
    plan = json.loads(capsys.readouterr().out)["executor"]
    shards = {p.file: p for p in plan_shards(_cast_graph(src), 20_000)}
    assert plan["name"] == "ray" and [t["shard"] for t in plan["tasks"]] == list(shards)
    for task in plan["tasks"]:
        assert task["bytes"] == shards[task["shard"]].nbytes  # the bf16 output, not the fp32 input
        assert task["memory_bytes"] >= 512 << 20
    assert main([*argv, "--max-memory", "1GiB"]) == 0
    plan = json.loads(capsys.readouterr().out)["executor"]
    assert plan == {"name": "local", "memory_budget_bytes": 1 << 30, "compute_threads": plan["compute_threads"],
                    "shards": len(shards)}
    assert not (tmp_path / "o").exists()


def _cast_graph(src: Path) -> Graph:
    graph = Graph.from_checkpoint(open_checkpoint(str(src)))
    for name in graph.names():
        node = graph.nodes[name]
        if node.dtype.is_floating_point:
            graph.nodes[name] = Apply(lambda w: w.bfloat16(), [node], label="cast", dtype=torch.bfloat16)
    return graph


@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_global_threshold_folded_in_chunks_and_merged_equals_one_fold(tmp_path, chunks):
    """The map-reduce split that --executor ray uses: partial folds over runs of tensors, merged in order."""
    from surgeon.ops.prune.magnitude import global_threshold_nodes

    from surgeon.ray_executor import reduce_chunk, reduced_value

    g = torch.Generator().manual_seed(3)
    ws = [Const(torch.randn(40, 30, generator=g)) for _ in range(7)]
    ws.append(Const(ws[0].value.clone()))  # exact ties across tensors
    threshold = global_threshold_nodes(ws, k=700, facts={})
    expected = Executor([threshold]).evaluate_all()[0]

    class ChunkingRay:  # runs map tasks in-process, in `chunks` pieces
        exceptions = type("E", (), {"RayTaskError": RuntimeError})

        @staticmethod
        def cluster_resources():
            return {"CPU": chunks}

        @staticmethod
        def remote(fn):
            class Task:
                def options(self, **kw):
                    return self

                def remote(self, *args):
                    return fn(*args)
            return Task()

        @staticmethod
        def get(refs):
            return refs

    got = reduced_value(threshold, {}, ChunkingRay())
    assert torch.equal(got, expected)
    counted = threshold.given[0]  # the bracket pass, from the sample pass's bracket
    acc = reduce_chunk(counted, [reduced_value(counted.given[0], {})], 0, len(counted.streamed))
    assert acc.result(len(ws))[0] == int(expected[0])  # it held the threshold: the fallback passes read nothing
