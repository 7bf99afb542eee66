"""`--executor ray` on a real local Ray cluster (a head and one more node on 127.0.0.1): bytes equal the local
executor's, a worker killed mid-task is retried, a failing task leaves no output.

Skipped only where the `ray` extra is not installed (`pip install 'surgeon[ray]'`; CI installs it from the lock).
The cluster is stopped with `ray stop`, which stops every Ray process of this user on the machine.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgeon.api import run_op
from surgeon.errors import SurgeonError
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import perturbed_copy

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'surgeon[ray]')")

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str) -> None:
    r = subprocess.run([RAY, *args], check=False, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]


@pytest.fixture(scope="module")
def ray_address():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    _ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", *common)
    try:
        _ray_cli("start", f"--address={address}", *common)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], check=False, capture_output=True, timeout=300)


@pytest.fixture
def on_cluster(ray_address, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    return ray_address


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "surgeon.json")
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json")
                           and p.name != "surgeon.json")
    assert any(n.endswith(".safetensors") for n in names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-models")
    base = save_tiny_llama(root / "base", layers=4, hidden=64)
    return base, perturbed_copy(base, root / "a", seed=1), perturbed_copy(base, root / "b", seed=2)


@pytest.mark.parametrize("job", ["cast", "global-magnitude", "ties"])
def test_ray_output_bytes_equal_local(on_cluster, models, tmp_path, job):
    base, a, b = models
    shard = {"max_shard_size": "40KB"}  # many shards, so many tasks
    if job == "cast":
        def run(out, **kw):
            return run_op("cast", base, output=out, dtype="bfloat16", **shard, **kw)
    elif job == "global-magnitude":
        def run(out, **kw):
            return run_op("prune.magnitude", a, output=out, sparsity=0.5, scope="global", **shard, **kw)
    else:
        def run(out, **kw):
            return run_op("merge.ties", [str(a), str(b)], base=str(base), output=out, density=0.5, **shard, **kw)
    run(tmp_path / "local")
    result = run(tmp_path / "ray", executor="ray")
    assert len(result["files"]) > 3
    _same_files(tmp_path / "local", tmp_path / "ray")
    assert not list((tmp_path / "ray").rglob("*.part-*"))


def _kill_first_attempt(marker: str):
    def fn(w: torch.Tensor) -> torch.Tensor:
        if not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-task, as on a lost node
        return w * 2

    return fn


def _write_with(graph_fn, out: Path, tmp_path: Path, **kw):
    from surgeon.graph import Apply, Graph
    from surgeon.sources import open_checkpoint
    from surgeon.writer import write_graph

    graph = Graph.from_checkpoint(open_checkpoint(str(kw.pop("src"))))
    name = "model.layers.2.mlp.down_proj.weight"
    graph.nodes[name] = Apply(graph_fn, [graph[name]], label="test")
    return write_graph(graph, out, max_shard_size=40_000, **kw)


def test_killed_worker_is_retried_and_bytes_still_equal(on_cluster, models, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    base = models[0]
    marker = tmp_path / "killed-once"
    _write_with(lambda w: w * 2, tmp_path / "local", tmp_path, src=base)
    _write_with(_kill_first_attempt(str(marker)), tmp_path / "ray", tmp_path, src=base, executor="ray")
    assert marker.exists()  # the first attempt did die
    _same_files(tmp_path / "local", tmp_path / "ray")
    assert not list((tmp_path / "ray").rglob("*.part-*"))


def test_failing_task_leaves_no_output(on_cluster, models, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def fail(w):
        raise SurgeonError("tensor 'model.layers.2.mlp.down_proj.weight': refused on purpose")

    with pytest.raises(SurgeonError, match="refused on purpose"):
        _write_with(fail, tmp_path / "out", tmp_path, src=models[0], executor="ray")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_without_ray_address_the_error_says_how_to_start_a_cluster(monkeypatch, tiny_llama, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SurgeonError, match="RAY_ADDRESS is not set; start a cluster"):
        run_op("cast", tiny_llama, output=tmp_path / "o", dtype="bfloat16", executor="ray")
    assert not (tmp_path / "o").exists()


def test_ray_cli_is_next_to_this_python():
    assert shutil.which(RAY) is not None
