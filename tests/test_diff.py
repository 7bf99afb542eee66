"""`surgeon diff`: relative change, new zeros, delta rank, dtype/shape changes, layers × roles heatmap."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon.diff import EXACT_RANK_MAX, delta_rank, diff_checkpoints, plot_diff
from surgeon.errors import SurgeonError
from surgeon.graph import Apply, Const, Graph, LowRank
from surgeon.sources import open_checkpoint


@pytest.fixture
def graph(tiny_llama) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(tiny_llama))


def test_identical_models_have_no_changes(graph):
    r = diff_checkpoints(graph, graph.copy())
    assert r["summary"]["n_same"] == len(graph) and "n_changed" not in r["summary"]
    assert all(t.get("rel_change") == 0.0 for t in r["tensors"].values())
    json.dumps(r)  # JSON-ready for --json


def test_changes_are_measured_per_tensor(graph):
    b = graph.copy()
    g = torch.Generator().manual_seed(0)
    q = "model.layers.1.self_attn.q_proj.weight"
    up = "model.layers.2.mlp.up_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    norm = "model.layers.3.input_layernorm.weight"
    b.nodes[q] = LowRank(graph[q], torch.randn(64, 3, generator=g), torch.randn(3, 64, generator=g))
    w_up = graph.value(up)
    pruned = w_up.clone()
    pruned.view(-1)[w_up.abs().flatten().argsort()[: w_up.numel() // 2]] = 0  # the smaller half set to zero
    b.nodes[up] = Const(pruned)
    b.nodes[down] = Apply(lambda x: x.to(torch.bfloat16), [graph[down]], label="cast", dtype=torch.bfloat16)
    b.nodes[norm] = Const(graph.value(norm) * 1.1)
    del b.nodes["lm_head.weight"]
    b.nodes["extra.weight"] = Const(torch.ones(3))
    r = diff_checkpoints(graph, b)
    t = r["tensors"]
    assert t[q]["delta_rank"] == 3 and t[q]["rank_exact"]
    delta = b.value(q).double() - graph.value(q).double()
    assert t[q]["rel_change"] == pytest.approx(float(delta.norm() / graph.value(q).double().norm()), rel=1e-9)
    assert t[up]["new_zeros"] == int((pruned == 0).sum()) == w_up.numel() // 2
    assert t[up]["rel_change"] == pytest.approx(float((w_up - pruned).norm() / w_up.norm()), rel=1e-6)
    assert t[down]["dtype"] == ["float32", "bfloat16"] and 0 < t[down]["rel_change"] < 1e-2
    assert t[norm]["rel_change"] == pytest.approx(0.1, rel=1e-6) and "delta_rank" not in t[norm]
    assert t["lm_head.weight"]["status"] == "only_a" and t["extra.weight"]["status"] == "only_b"
    s = r["summary"]
    assert s["n_changed"] == 4 and s["n_only_a"] == 1 and s["n_only_b"] == 1
    assert s["largest_changes"][0]["name"] == q
    lay = r["layers"]
    assert lay["family"] == "llama" and len(lay["rows"]) == 4
    assert lay["rows"][1][lay["roles"].index("attn.q")] == t[q]["rel_change"]
    assert lay["rows"][0][lay["roles"].index("attn.q")] == 0.0


def test_shape_change_is_reported(graph):
    b = graph.copy()
    b.nodes["model.norm.weight"] = Const(torch.ones(65))
    b.configs[""]["hidden_size"] = 65
    r = diff_checkpoints(graph, b)
    assert r["tensors"]["model.norm.weight"] == {"status": "shape", "shape": [[64], [65]]}
    assert r["config_changes"]["hidden_size"] == [64, 65]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def test_delta_rank_exact_and_sketched(monkeypatch):
    import surgeon.diff as sd

    g = torch.Generator().manual_seed(1)
    low = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    assert delta_rank(low) == (5, True)
    assert delta_rank(low + 1e-6 * torch.randn(300, 200, generator=g), rank_tol=1e-3) == (5, True)
    assert delta_rank(torch.zeros(4, 4)) == (0, True)
    # the sketch path, at a small scale: large matrices use it above EXACT_RANK_MAX
    monkeypatch.setattr(sd, "EXACT_RANK_MAX", 64)
    monkeypatch.setattr(sd, "SKETCH_RANK", 16)
    assert EXACT_RANK_MAX >= 512
    big = torch.randn(90, 7, generator=g) @ torch.randn(7, 100, generator=g)
    assert sd.delta_rank(big) == (7, True)  # sketched, rank below the sketch size: exact
    r, exact = sd.delta_rank(torch.randn(90, 100, generator=g))
    assert r == 16 and not exact  # a lower bound
    with pytest.raises(SurgeonError, match="rank_tol"):
        diff_checkpoints(Graph({}), Graph({}), rank_tol=0)


def test_plot_heatmap_png(graph, tmp_path):
    pytest.importorskip("matplotlib")
    b = graph.copy()
    name = "model.layers.2.mlp.down_proj.weight"
    b.nodes[name] = Const(graph.value(name) * 0.5)
    r = diff_checkpoints(graph, b)
    out = plot_diff(r, tmp_path / "d.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(SurgeonError, match="--plot"):
        plot_diff({"layers": {"error": "unknown architecture"}}, tmp_path / "x.png")


def test_plot_without_matplotlib_is_a_clear_error(graph, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(SurgeonError, match="needs matplotlib"):
        plot_diff({"layers": None}, tmp_path / "x.png")


def test_render_diff_prints_tables(graph):
    from rich.console import Console

    b = graph.copy()
    name = "model.layers.2.mlp.down_proj.weight"
    b.nodes[name] = Const(graph.value(name) * 0.5)
    b.nodes["zero.weight"] = Const(torch.zeros(2, 2))
    r = diff_checkpoints(graph, b)
    json.dumps(r, allow_nan=False)  # strict JSON: no Infinity/NaN
    from surgeon.diff import render_diff

    console = Console(record=True, width=200)
    render_diff(r, console=console)
    text = console.export_text()
    assert name in text and "0.500" in text and "only_b" in text and "mlp.down" in text


def test_cli_diff_json_and_plot(tiny_llama, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from safetensors.torch import load_file, save_file

    from surgeon.cli import main

    b = tmp_path / "b"
    b.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (b / f.name).write_bytes(f.read_bytes())
    state = load_file(tiny_llama / "model.safetensors")
    state["model.layers.3.mlp.up_proj.weight"] *= 2
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    assert main(["diff", str(tiny_llama), str(b), "--json", "--plot", str(tmp_path / "d.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["n_changed"] == 1
    assert out["tensors"]["model.layers.3.mlp.up_proj.weight"]["rel_change"] == pytest.approx(1.0)
    assert (tmp_path / "d.png").stat().st_size > 5000
    assert main(["diff", str(tiny_llama), str(tmp_path / "missing")]) == 2
