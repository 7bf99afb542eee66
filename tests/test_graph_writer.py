"""Lazy graph execution (refcounted freeing) and the streaming, atomic writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Const, Executor, Graph, Load, LowRank, Reduce
from surgeon.sources import open_checkpoint
from surgeon.writer import plan_shards, write_graph


def _graph(tmp_path: Path, n: int = 4, size: int = 32) -> Graph:
    d = tmp_path / "src"
    d.mkdir()
    save_file({f"t{i}": torch.randn(size, size) for i in range(n)}, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    return Graph.from_checkpoint(open_checkpoint(d))


def test_shared_node_computed_once_and_freed_after_last_use(tmp_path):
    g = _graph(tmp_path)
    calls = []

    def expensive(x):
        calls.append(1)
        return x * 2

    shared = Apply(expensive, [g["t0"]], label="shared")
    outs = [Apply(lambda s, t: s + t, [shared, g[f"t{i}"]], label="add") for i in range(1, 4)]
    ex = Executor(outs)
    vals = [ex.value(o) for o in outs[:2]]
    assert ex.live == 1  # the shared value stays while a consumer remains
    for o in outs[:2]:
        ex.release(o)
    v3 = ex.value(outs[2])
    ex.release(outs[2])
    assert len(calls) == 1 and ex.live == 0 and ex.max_live == 1
    t0 = g.value("t0")
    assert torch.allclose(vals[0], 2 * t0 + g.value("t1")) and torch.allclose(v3, 2 * t0 + g.value("t3"))


def test_reduce_streams_inputs_and_lowrank_adds_delta(tmp_path):
    g = _graph(tmp_path)
    total = Reduce([g[n] for n in g.names()], init=lambda: torch.zeros(()), step=lambda a, v, i: a + v.abs().sum(),
                   finish=lambda a: a, shape=(), dtype=torch.float32, label="abs-sum")
    expect = sum(g.value(n).abs().sum() for n in g.names())
    assert torch.allclose(Executor([total]).evaluate_all()[0], expect)
    up, down = torch.randn(32, 2), torch.randn(2, 32)
    lr = LowRank(g["t0"], up, down)
    assert torch.allclose(Executor([lr]).evaluate_all()[0], g.value("t0") + up @ down, atol=1e-5)
    with pytest.raises(SurgeonError, match="does not fit"):
        LowRank(g["t0"], torch.randn(31, 2), down)


def test_untouched_tensors_copied_byte_for_byte_and_card(tmp_path):
    g = _graph(tmp_path)
    g = g.copy()
    g.nodes["t1"] = Apply(lambda t: t.to(torch.bfloat16), [g["t1"]], label="cast", dtype=torch.bfloat16)
    g.nodes["extra"] = Const(torch.arange(6, dtype=torch.int32))
    g.results.append({"title": "eval", "perplexity": 12.5})
    out = tmp_path / "out"
    write_graph(g, out, provenance={"steps": [{"op": "cast", "seconds": 0.1}]}, recipe={"model": "x", "steps": []})
    src = (tmp_path / "src" / "model.safetensors")
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(src, "pt") as s:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("t0"), s.get_tensor("t0"))
        assert f.get_tensor("t1").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("extra"), torch.arange(6, dtype=torch.int32))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "surgeon" in card and "| perplexity | 12.5 |" in card
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "surgeon.json").read_text())["outputs"]["tensors"] == 5
    assert not list(tmp_path.glob("out.tmp-*"))


def test_shards_and_index_exact(tmp_path):
    g = _graph(tmp_path, n=5, size=16)  # 1024 bytes each
    plans = plan_shards(g, max_shard_size=2048)
    assert [p.names for p in plans] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    out = tmp_path / "out"
    write_graph(g, out, max_shard_size=2048)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    back = open_checkpoint(out)
    for n in g.names():
        assert torch.equal(back.load(n), g.value(n))


def test_output_refusals_leave_nothing(tmp_path):
    g = _graph(tmp_path)
    with pytest.raises(SurgeonError, match="overlaps the input"):
        write_graph(g, tmp_path / "src")
    with pytest.raises(SurgeonError, match="overlaps the input"):
        write_graph(g, tmp_path / "src" / "inner")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(SurgeonError, match="not empty.*--force"):
        write_graph(g, busy)
    assert (busy / "keep.txt").read_text() == "user data"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.geteuid() != 0:  # root ignores permission bits
            with pytest.raises(SurgeonError, match="not writable"):
                write_graph(g, ro / "out")
    finally:
        ro.chmod(0o700)


def test_failure_mid_write_removes_temp_and_keeps_inputs(tmp_path):
    g = _graph(tmp_path).copy()
    before = (tmp_path / "src" / "model.safetensors").read_bytes()

    def boom(t):
        raise KeyboardInterrupt

    g.nodes["t2"] = Apply(boom, [g["t2"]], label="boom")
    with pytest.raises(KeyboardInterrupt):
        write_graph(g, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert (tmp_path / "src" / "model.safetensors").read_bytes() == before


def test_nonfinite_refused_unless_allowed(tmp_path):
    d = tmp_path / "nan"
    d.mkdir()
    save_file({"w": torch.tensor([1.0, float("nan")])}, d / "model.safetensors")
    g = Graph.from_checkpoint(open_checkpoint(d))
    with pytest.raises(SurgeonError, match="'w' contains NaN"):
        write_graph(g, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(SurgeonError, match="'w' contains NaN"):  # refused as soon as an op reads it
        g.value("w")
    g = Graph.from_checkpoint(open_checkpoint(d, allow_nonfinite=True))
    write_graph(g, tmp_path / "o2", allow_nonfinite=True)
    assert torch.isnan(open_checkpoint(tmp_path / "o2").load("w", check=False)[1])


def test_peak_live_values_flat_in_model_size(tmp_path):
    """A tensor-wise chain keeps at most one cached value whatever the number of tensors."""
    for n in (4, 16):
        (tmp_path / f"m{n}").mkdir()
        g2 = _graph(tmp_path / f"m{n}", n=n).copy()
        for name in g2.names():
            g2.nodes[name] = Apply(lambda t: t * 0.5, [Apply(lambda t: t + 1, [g2[name]], label="a")], label="b")
        ex = Executor([g2[n_] for n_ in g2.names()])
        ex.evaluate_all()
        assert ex.max_live == 0


def test_load_node_reports_shape_without_reading(tmp_path, monkeypatch):
    g = _graph(tmp_path)
    ck = g.sources[0]
    monkeypatch.setattr(ck, "load", lambda name: (_ for _ in ()).throw(AssertionError("read!")))
    node = g["t0"]
    assert isinstance(node, Load) and node.shape == (32, 32) and node.dtype == torch.float32
    plan_shards(g, 10**9)
    Context()


def _sharded_source(tmp_path: Path) -> Path:
    """Three shards of two 64x64 fp32 tensors each (32 KiB + header per file), with their index."""
    d = tmp_path / "sharded"
    d.mkdir()
    weight_map = {}
    for k in range(3):
        name = f"model-{k + 1:05d}-of-00003.safetensors"
        tensors = {f"t{2 * k + j}": torch.randn(64, 64) for j in range(2)}
        save_file(tensors, d / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    return d


def _layout(folder: Path) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            files[f.name] = sorted(fh.keys())
    return files


def test_default_shard_size_keeps_a_sharded_input_layout(tmp_path):
    """``auto``: a sharded input keeps its shards (same files, same tensors, same bytes for a passthrough); a
    single-file input stays one file; a cast of the sharded input packs into shards of the input's size."""
    src = _sharded_source(tmp_path)
    write_graph(Graph.from_checkpoint(open_checkpoint(src)), tmp_path / "same")
    assert _layout(tmp_path / "same") == _layout(src)
    for f in src.glob("*.safetensors"):
        assert (tmp_path / "same" / f.name).read_bytes() == f.read_bytes()
    g = Graph.from_checkpoint(open_checkpoint(src))
    for name in g.names():
        g.nodes[name] = Apply(lambda w: w.half(), [g.nodes[name]], label="half", dtype=torch.float16)
    write_graph(g, tmp_path / "half")
    assert [len(v) for v in _layout(tmp_path / "half").values()] == [4, 2]  # 8 KiB per tensor, ~16.5 KiB shards
    write_graph(_graph(tmp_path), tmp_path / "single")
    assert list(_layout(tmp_path / "single")) == ["model.safetensors"]
    write_graph(Graph.from_checkpoint(open_checkpoint(src)), tmp_path / "one", max_shard_size="5GB")
    assert list(_layout(tmp_path / "one")) == ["model.safetensors"]


def test_bad_shard_size_names_the_flag_and_its_forms(tmp_path, capsys):
    from surgeon.cli import main

    src = _sharded_source(tmp_path)
    code = main(["drop", str(src), "--pattern", "^t0$", "-o", str(tmp_path / "o"), "--max-shard-size", "half"])
    assert code == 2 and not (tmp_path / "o").exists()
    assert "--max-shard-size: expected a size like 5GB or 500MB, or auto, got 'half'" in capsys.readouterr().err
