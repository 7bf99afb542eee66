"""prune.magnitude: exact sparsity per matrix, globally and per N:M group; lazy and streaming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from surgeon.kernels import select_band
from surgeon.ops.prune.common import Mapped, Pruned, nm_prune
from surgeon.ops.prune.magnitude import Deferred, Params, apply, n_pruned

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.pipeline import validate_step
from surgeon.sources import open_checkpoint


def _graph(path: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(path))


def _linears(g: Graph) -> list[str]:
    return [n for n in g.names() if ".layers." in n and n.endswith("proj.weight")]


def test_per_matrix_sparsity_is_exact_and_smallest_go(tiny_llama):
    g = _graph(tiny_llama)
    g2 = apply(g, Params(sparsity=0.6), Context())
    names = _linears(g)
    assert len(names) == 4 * 7
    for n in names:
        w, p = g.value(n), g2.value(n)
        assert isinstance(g2[n], Pruned)
        assert int((p == 0).sum()) == n_pruned(w.numel(), 0.6)
        kept = p != 0
        assert torch.equal(p[kept], w[kept])  # survivors untouched
        assert w.abs()[~kept].max() <= w.abs()[kept].min()  # the smallest went
    for n in g.names():  # embeddings, head, norms stay dense and untouched
        if n not in names:
            assert g2.untouched(n), n


def test_global_scope_threshold_is_exact_over_all_selected(tiny_llama):
    from safetensors.torch import load_file, save_file

    f = tiny_llama / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.down_proj.weight"] *= 10  # one loud matrix: global keeps more of it
    save_file(sd, f, metadata={"format": "pt"})
    g = _graph(tiny_llama)
    ctx = Context()
    g2 = apply(g, Params(sparsity=0.5, scope="global"), ctx)
    names = _linears(g)
    allw = torch.cat([g.value(n).abs().flatten() for n in names])
    k = n_pruned(allw.numel(), 0.5)
    thr = torch.kthvalue(allw, k).values
    zeros = 0
    per = []
    for n, v in g2.values(names):
        w = g.value(n)
        assert torch.equal((v == 0), (w.abs() <= thr))  # no exact ties in random fp32 weights
        zeros += int((v == 0).sum())
        per.append(float((v == 0).float().mean()))
    assert zeros == k
    assert min(per) < 0.1 and max(per) > 0.5  # global: the loud matrix is barely pruned
    facts = ctx.step_info["global_threshold"]
    assert facts["threshold"] == float(thr)
    assert set(facts["sparsity_per_tensor"]) == set(names)


def test_global_scope_streams_without_holding_the_model(tiny_llama):
    g2 = apply(_graph(tiny_llama), Params(sparsity=0.5, scope="global"), Context())
    names = _linears(g2)
    from surgeon.graph import Executor

    ex = Executor([g2[n] for n in g2.names()])
    for n in g2.names():
        ex.value(g2[n])
        ex.release(g2[n])
    # only the small threshold tensor is shared; no weight is cached while streaming
    assert ex.max_live <= 1
    red = g2[names[0]].inputs[0]
    counted = red.given[0]  # the bracket pass; the exact fallback passes read tensors only when it missed
    assert all(isinstance(i, Mapped) for i in counted.streamed)  # the source's map: no edge, no copy
    assert all(isinstance(i, Deferred) for i in red.streamed)


def test_global_ties_break_by_tensor_then_index(tmp_path):
    from safetensors.torch import save_file
    from surgeon.ops.prune.magnitude import global_threshold_nodes

    a = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    b = torch.tensor([[2.0, 2.0], [0.5, 4.0]])
    save_file({"a": a, "b": b}, tmp_path / "m.safetensors")
    g = _graph(tmp_path / "m.safetensors")
    facts = {"threshold": None, "sparsity_per_tensor": {}, "above_95_percent": []}
    red = global_threshold_nodes([g["a"], g["b"]], 4, facts)
    out = Graph({"r": red}).value("r").tolist()
    # sorted: 0.5, 1, then four 2.0s; k=4 needs two of them: both from 'a' (first tensor)
    assert out[1:] == [2, 0]
    assert facts["threshold"] == 2.0


def test_global_bracket_miss_runs_the_exact_histogram_passes(tiny_llama, monkeypatch):
    from surgeon.ops.prune import magnitude

    g = _graph(tiny_llama)
    names = _linears(g)
    expected = apply(g, Params(sparsity=0.5, scope="global"), Context())
    reads = []
    monkeypatch.setattr(magnitude, "bracket", lambda sample, q: (0, 1))  # holds no |w|: the count must miss
    monkeypatch.setattr(magnitude.StreamingKth, "add_high",
                        lambda self, x, f=magnitude.StreamingKth.add_high: reads.append(1) or f(self, x))
    from surgeon.graph import Executor

    got = apply(g, Params(sparsity=0.5, scope="global"), Context())
    values = dict(zip(names, Executor([got[n] for n in names]).evaluate_all()))
    assert len(reads) == len(names)  # the fallback read every tensor once for its histogram
    allw = torch.cat([g.value(n).abs().flatten() for n in names])
    thr = torch.kthvalue(allw, n_pruned(allw.numel(), 0.5)).values
    for n in names:
        assert torch.equal(values[n], expected.value(n)), n
        w = g.value(n)
        assert torch.equal(values[n] == 0, (w.abs() <= thr) | (w == 0)), n  # no ties at thr in random data


@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8"])
def test_nm_every_group_has_exactly_n_nonzeros(tiny_llama, nm):
    n, m = map(int, nm.split(":"))
    g = _graph(tiny_llama)
    g2 = apply(g, Params(nm=nm), Context())
    for name in _linears(g):
        w, p = g.value(name), g2.value(name)
        groups = p.reshape(p.shape[0], -1, m)
        assert bool(((groups != 0).sum(-1) == n).all()), name
        wg = w.abs().reshape(w.shape[0], -1, m)
        kept_min = torch.where(groups != 0, wg, torch.inf).min(-1).values
        dropped_max = torch.where(groups == 0, wg, -torch.inf).max(-1).values
        assert bool((kept_min >= dropped_max).all())


def test_nm_on_transposed_conv1d_groups_along_dim0():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 6, generator=g)  # Conv1D storage [d_in=16, d_out=6]
    p = nm_prune(w, 2, 4, transposed=True)
    cols = p.T.reshape(6, 4, 4)  # per output, groups of 4 consecutive inputs
    assert bool(((cols != 0).sum(-1) == 2).all())
    ref = nm_prune(w.T.contiguous(), 2, 4).T
    assert torch.equal(p, ref)


def test_selectors_include_exclude(tiny_llama):
    g = _graph(tiny_llama)
    g2 = apply(g, Params(sparsity=0.5, include=["mlp.*", "lm_head"], exclude=["mlp.down[0, 2)"]), Context())
    pruned = {n for n in g2.names() if not g2.untouched(n)}
    expected = {f"model.layers.{i}.mlp.{r}_proj.weight" for i in range(4) for r in ("gate", "up", "down")}
    expected -= {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    expected.add("lm_head.weight")
    assert pruned == expected


def test_bf16_checkpoint_keeps_dtype_and_exact_zeros(tmp_path):
    p = save_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, layers=2)
    g = _graph(p)
    g2 = apply(g, Params(sparsity=0.3), Context())
    n = "model.layers.1.mlp.up_proj.weight"
    v = g2.value(n)
    assert v.dtype == torch.bfloat16
    assert int((v == 0).sum()) == n_pruned(v.numel(), 0.3)


def test_bad_params_fail_before_any_tensor_is_read():
    with pytest.raises(SurgeonError, match="nm"):
        validate_step("prune.magnitude", {"nm": "4:2"})
    with pytest.raises(SurgeonError, match="contradicts"):
        validate_step("prune.magnitude", {"nm": "2:4", "sparsity": 0.3})
    with pytest.raises(SurgeonError, match="global"):
        validate_step("prune.magnitude", {"nm": "2:4", "scope": "global"})
    with pytest.raises(SurgeonError):
        validate_step("prune.magnitude", {"sparsity": 1.0})
    with pytest.raises(SurgeonError):
        validate_step("prune.magnitude", {"sparsity": 0.5, "bogus": 1})


def test_bad_selection_names_the_problem(tiny_llama):
    g = _graph(tiny_llama)
    with pytest.raises(SurgeonError, match="2-D"):
        apply(g, Params(include=["norm.*"]), Context())
    with pytest.raises(SurgeonError, match="matches no tensor"):
        apply(g, Params(include=["attn.nonexistent"]), Context())
    with pytest.raises(SurgeonError, match="multiple of M"):
        apply(g, Params(nm="2:5"), Context())


def test_run_op_writes_dense_zeros_without_sparsity_config(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from surgeon.api import run_op

    out = tmp_path / "out"
    res = run_op("prune.magnitude", str(tiny_llama), output=str(out), sparsity=0.5, scope="global", device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in json.dumps(cfg)
    sd = load_file(out / "model.safetensors")
    lin = [n for n in sd if ".layers." in n and n.endswith("proj.weight")]
    zeros = sum(int((sd[n] == 0).sum()) for n in lin)
    total = sum(sd[n].numel() for n in lin)
    assert zeros == n_pruned(total, 0.5)
    prov = json.loads((out / "surgeon.json").read_text())
    info = prov["steps"][0]["info"]
    assert info["sparsity"] == pytest.approx(0.5, abs=1e-5)
    per = info["global_threshold"]["sparsity_per_tensor"]
    assert len(per) == len(lin)  # filled while streaming, present in surgeon.json
    assert res["output"]


@pytest.mark.parametrize(("scope", "value"), [("layer", float("nan")), ("global", float("inf"))])
def test_nan_or_inf_in_a_pruned_matrix_is_refused_even_when_allowed(tiny_llama, tmp_path, scope, value):
    """--allow-nonfinite lets NaN/Inf pass through copies, never through ranking (the kernel's histogram finds
    them); the writer does not check pruned values again, so this refusal is the only one."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for f in Path(tiny_llama).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    name = "model.layers.2.mlp.up_proj.weight"
    weights[name][3, 5] = value
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    from surgeon.writer import write_graph

    g = apply(Graph.from_checkpoint(open_checkpoint(src, allow_nonfinite=True)), Params(sparsity=0.5, scope=scope),
              Context())
    with pytest.raises(SurgeonError, match=rf"tensor '{name}' contains NaN or Inf \(magnitude pruning ranks"):
        write_graph(g, tmp_path / "out", allow_nonfinite=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_writer_prunes_on_raw_storage_with_the_torch_paths_bytes(tmp_path, monkeypatch, dtype):
    """Per-matrix pruning of a safetensors source runs on its raw storage (no aligned copy, no torch tensor):
    the writer takes that path, and every pruned tensor has exactly the bytes of the torch path. fp32 and
    bfloat16 matrices of the sampled bracket's size are pruned in one read (C kernel), float16 in two."""
    from surgeon.ops.prune import magnitude

    from surgeon.graph import Executor, runs_on_host

    once = []
    real = magnitude.zero_smallest_k_once
    monkeypatch.setattr(magnitude, "zero_smallest_k_once", lambda *a: once.append(real(*a)) or once[-1])
    g = _graph(save_tiny_llama(tmp_path / "m", dtype=dtype, layers=2, hidden=256))  # the MLP: the sampled bracket
    g2 = apply(g, Params(sparsity=0.45), Context())
    names = _linears(g)
    assert names and all(runs_on_host(g2[n]) for n in names)
    host, torch_path = Executor([g2[n] for n in names]), Executor([g2[n] for n in names])
    for n in names:
        a = host.host_value(g2[n])
        b = torch_path.value(g2[n])
        assert a.dtype == str(dtype).removeprefix("torch.") and b.dtype == dtype
        assert a.data.tobytes() == b.view(torch.uint8).numpy().tobytes(), n
    big = [n for n in names if g[n].shape[0] * g[n].shape[1] >= 1 << 16]
    one_read = dtype != torch.float16 and select_band._library() is not None
    assert big and sum(r is not None for r in once) == (len(big) if one_read else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 256])  # 64: the radix select; 256: the sampled bracket
def test_the_writer_streams_pruned_pieces_with_the_torch_paths_bytes(tmp_path, monkeypatch, dtype, hidden):
    """Per-matrix pruning of a source tensor is written piece by piece (threshold first, then each 4 KiB piece
    zeroed on its way to the file; a non-fp32 threshold pass converts 1,000 entries at a time). Nonzero weights
    on a coarse grid make many entries equal to the threshold, so the ties owed cross piece edges: every
    tensor has exactly the bytes of the torch path."""
    from safetensors.torch import load_file, save_file
    from surgeon.ops.prune import magnitude

    from surgeon import executor
    from surgeon.graph import Executor
    from surgeon.writer import write_graph

    src = save_tiny_llama(tmp_path / "m", dtype=torch.float32, layers=2, hidden=hidden)
    weights = {n: (torch.sign(t) * (torch.floor(t.abs() * 2048) + 1) / 2048).to(dtype)  # no zeros: visible ties
               for n, t in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(executor, "WRITE_CHUNK", 4096)
    monkeypatch.setattr(magnitude, "STREAM_CHUNK", 1000)
    monkeypatch.setattr(magnitude, "STREAM_MIN_BYTES", 0)  # stream even these small tensors
    streamed = []
    real = executor.stream_run
    monkeypatch.setattr(executor, "stream_run", lambda run, *a: (streamed.append(run.tensors[0][0]), real(run, *a)))
    g = apply(_graph(src), Params(sparsity=0.45), Context())
    write_graph(g, tmp_path / "out")
    names = _linears(g)
    assert sorted(streamed) == sorted(names)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = Executor([g[n] for n in names])
    split = 0
    for n in names:
        expected = ref.value(g[n])
        assert out[n].dtype == dtype and torch.equal(out[n].view(torch.uint8), expected.view(torch.uint8)), n
        assert int((expected == 0).sum()) == n_pruned(expected.numel(), 0.45)
        kept = expected[expected != 0].abs().min()
        split += int((weights[n].abs() == kept).sum()) > int((expected.abs() == kept).sum())  # ties zeroed in part
    assert split >= len(names) // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_global_pruning_streams_each_matrix_with_the_torch_paths_bytes(tmp_path, monkeypatch, dtype):
    """Global pruning writes each matrix piece by piece from its source, the reduction's threshold and ties given
    beside it (no matrix-sized buffer). Weights on a coarse grid put many entries at the global threshold, so the
    ties owed split inside matrices and across 4 KiB pieces: every matrix has the bytes of the torch path, exactly
    k zeros overall, and the sparsity per matrix in the report equals the one counted in the written file."""
    from safetensors.torch import load_file, save_file

    from surgeon import executor
    from surgeon.graph import Executor
    from surgeon.writer import write_graph

    src = save_tiny_llama(tmp_path / "m", dtype=torch.float32, layers=2, hidden=64)
    weights = {n: (torch.sign(t) * (torch.floor(t.abs() * 64) + 1) / 64).to(dtype)
               for n, t in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(executor, "WRITE_CHUNK", 4096)
    streamed = []
    real = executor.stream_run
    monkeypatch.setattr(executor, "stream_run", lambda run, *a: (streamed.append(run.tensors[0][0]), real(run, *a)))
    ctx = Context()
    g = apply(_graph(src), Params(sparsity=0.45, scope="global"), ctx)
    write_graph(g, tmp_path / "out")
    names = _linears(g)
    assert sorted(streamed) == sorted(names)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    facts = ctx.step_info["global_threshold"]
    streamed_facts = dict(facts["sparsity_per_tensor"])
    ref = Executor([g[n] for n in names])
    zeros = total = split = 0
    for n in names:
        expected = ref.value(g[n])
        assert out[n].dtype == dtype and torch.equal(out[n].view(torch.uint8), expected.view(torch.uint8)), n
        frac = int((out[n] == 0).sum()) / out[n].numel()
        assert streamed_facts[n] == round(frac, 6)
        zeros, total = zeros + int((out[n] == 0).sum()), total + out[n].numel()
        t = facts["threshold"]
        split += 0 < int((out[n].float().abs() == t).sum()) < int((weights[n].float().abs() == t).sum())
    assert zeros == n_pruned(total, 0.45) and split >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_nm_pruning_streams_with_the_torch_paths_bytes(tmp_path, monkeypatch, dtype, nm):
    """N:M pruning of fp32/bf16 sources is written piece by piece (groups are independent; C kernel), fp16 by
    the torch path; weights on a coarse grid with signed zeros make ties inside groups, which zero the lower
    index first: every matrix has the bytes of the torch path, in both the streamed and the whole-tensor host
    form."""
    from safetensors.torch import load_file, save_file
    from surgeon.ops.prune import magnitude

    from surgeon import executor
    from surgeon.graph import Executor
    from surgeon.writer import write_graph

    src = save_tiny_llama(tmp_path / "m", dtype=torch.float32, layers=2, hidden=64)
    weights = {n: (torch.round(t * 8) / 8).to(dtype) for n, t in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(executor, "WRITE_CHUNK", 4096)
    streamed = []
    real = executor.stream_run
    monkeypatch.setattr(executor, "stream_run", lambda run, *a: (streamed.append(run.tensors[0][0]), real(run, *a)))
    g = apply(_graph(src), Params(nm=nm), Context())
    write_graph(g, tmp_path / "out")
    names = _linears(g)
    assert sorted(streamed) == (sorted(names) if dtype != torch.float16 else [])
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref, host = Executor([g[n] for n in names]), Executor([g[n] for n in names])
    n_keep, m = (int(v) for v in nm.split(":"))
    for n in names:
        expected = ref.value(g[n])
        assert torch.equal(out[n].view(torch.uint8), expected.view(torch.uint8)), n
        assert host.host_value(g[n]).data.tobytes() == expected.view(torch.uint8).numpy().tobytes(), n
        assert int((expected == 0).sum()) >= expected.numel() * (m - n_keep) // m
    assert magnitude.NM_PIECE_ENTRIES % m == 0
