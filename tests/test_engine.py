"""The sequential model engine: block-by-block results equal a whole-model forward written here in plain torch,
for several families; hidden states spilled to disk change nothing; changed tensors come back as lazy nodes;
input statistics equal a literal computation; two gloo processes give the one-process statistics and masks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from surgeon.engine import Engine, InputStats, Spilled, SpillStore
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def _save(kind: str, folder: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64))
    elif kind == "gpt2":  # Conv1D, learned positions, tied head
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60, n_positions=64))
    elif kind == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                           word_embed_proj_dim=32, vocab_size=60, max_position_embeddings=64))
    else:  # gemma2: embedding scale, pre/post norms, logit soft-capping, tied head
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                 vocab_size=60, final_logit_softcapping=3.0))
    m.save_pretrained(folder, safe_serialization=True)
    return folder


def _graph(folder: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(folder))


def _reference_nll(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole model in one forward (transformers' own loading): per-token NLL [n, L-1] and argmax."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="none")
    return nll.reshape(ids.shape[0], -1), logits.argmax(-1)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "gemma2"])
def test_scores_equal_the_whole_model_forward(kind, tmp_path):
    folder = _save(kind, tmp_path / kind)
    ids = torch.randint(0, 60, (5, 17), generator=torch.Generator().manual_seed(1))
    ref_nll, ref_arg = _reference_nll(folder, ids)
    out = Engine(_graph(folder), micro_batch=2).score(ids)
    got = torch.stack([out.nll[i] for i in range(5)])
    assert torch.allclose(got, ref_nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.stack([out.argmax[i] for i in range(5)]), ref_arg)


def test_spilled_hidden_states_and_uneven_lengths_change_nothing(tmp_path):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    rows = [torch.randint(0, 60, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 9, 5, 12)]
    in_ram = Engine(g, micro_batch=3).score(rows)
    eng = Engine(g, micro_batch=3, hidden_budget=0)  # every micro-batch's hidden states go to disk
    on_disk = eng.score(rows)
    assert eng._hidden.spilled > 0
    for i, r in enumerate(rows):
        ref, _ = _reference_nll(folder, r[None])
        assert torch.allclose(on_disk.nll[i], ref[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(on_disk.nll[i], in_ram.nll[i])


def test_input_statistics_equal_a_literal_computation(tmp_path):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    ids = torch.randint(0, 60, (4, 11), generator=torch.Generator().manual_seed(2))
    name = "model.layers.1.mlp.down_proj.weight"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = []
    h = m.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    h.remove()
    x = torch.cat(seen).double()
    got = {}
    eng = Engine(g, micro_batch=3)
    for block in eng.blocks(ids, layers=[1]):
        got = block.observe({name: ("sq_norm", "xtx", "sum", "count")})[name]
    assert got.count == 44
    assert torch.allclose(got.sq_norm, (x * x).sum(0), rtol=1e-6)
    assert torch.allclose(got.xtx, x.T @ x, rtol=1e-6, atol=1e-9)
    assert torch.allclose(got.sum, x.sum(0), rtol=1e-6, atol=1e-9)
    with pytest.raises(SurgeonError, match="unknown statistic 'mean'"):
        InputStats(4, ("mean",))


def test_changed_tensors_spill_and_return_as_lazy_nodes_seen_by_later_blocks(tmp_path):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    ids = torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(3))
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    eng = Engine(g, micro_batch=2, spill_dir=str(tmp_path / "spill"))
    for block in eng.blocks(ids):
        for n in names:
            if n in block.names:
                block.param(n).mul_(0.5)
    g2 = eng.apply_changes(g)
    assert set(eng.changed) == set(names)
    for n in names:
        assert isinstance(g2[n], Spilled) and Path(g2[n].path).parent.parent == tmp_path / "spill"
        assert torch.equal(g2.value(n), g.value(n) * 0.5)
    # a second engine reads the changed graph: same as transformers on a folder holding the halved weights
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for n in names:
            m.get_parameter(n).mul_(0.5)
        logits = m(input_ids=ids, use_cache=False).logits[:, :-1]
    ref = F.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="none").reshape(3, -1)
    out = Engine(g2).score(ids)
    assert torch.allclose(torch.stack([out.nll[i] for i in range(3)]), ref, rtol=1e-5, atol=1e-6)


def test_spill_store_round_trip(tmp_path):
    store = SpillStore(tmp_path)
    t = torch.randn(3, 4).to(torch.bfloat16)
    node = store.put("a/b.weight", t)
    assert node.shape == (3, 4) and node.dtype == torch.bfloat16
    assert torch.equal(node.compute([]), t)


def test_budget_too_small_for_one_block_and_unknown_blocks_are_one_line_errors(tmp_path):
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    with pytest.raises(SurgeonError, match=r"--max-memory 0 MB: decoder block 'model.layers.0.' alone needs"):
        Engine(g, max_memory=1000)
    g.configs[""]["model_type"] = "mystery"
    renamed = Graph({n.replace("model.layers.", "trunk.blk."): v for n, v in g.nodes.items()}, g.configs)
    with pytest.raises(SurgeonError, match="engine: cannot find the decoder blocks of this model") as e:
        Engine(renamed)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- data parallel
def _wanda_and_stats(folder: Path) -> dict[str, torch.Tensor]:
    """Statistics of one block, summed NLL and Wanda masks (through the op) on a tiny Llama."""
    from surgeon.ops.prune import wanda

    from surgeon.context import Context
    from surgeon.engine import dist

    g = _graph(folder)
    ids = torch.randint(0, 100, (7, 12), generator=torch.Generator().manual_seed(4))
    name = "model.layers.2.mlp.down_proj.weight"
    stats = {}
    for block in Engine(g, micro_batch=2).blocks(ids, layers=[2]):
        stats = block.observe({name: ("sq_norm", "xtx")})
    head = Engine(g, micro_batch=2).score(ids)
    nll = torch.tensor([float(sum(v.sum() for v in head.nll.values()))], dtype=torch.float64)
    dist.all_reduce_(nll)
    g2 = wanda.apply(g, wanda.Params(data=str(folder / "calib.txt"), sparsity=0.5, seqlen=8, n_windows=7,
                                     batch_size=2), Context(quiet=True))
    masks = {n: (g2.value(n) == 0) for n in g.names() if n.endswith("proj.weight") and "layers" in n}
    return {"sq": stats[name].sq_norm, "xtx": stats[name].xtx, "count": torch.tensor(stats[name].count),
            "nll": nll, **masks}


def test_two_gloo_processes_equal_one_process(tmp_path):
    """Each rank runs its slice of the samples; statistics are all-reduced (sums in fp64, so equal to 1e-12
    relative), NLL totals to 1e-9 relative, and the Wanda masks are identical."""
    from conftest import run_on_gloo_ranks, save_tiny_llama_with_tokenizer, word_text

    folder = save_tiny_llama_with_tokenizer(tmp_path / "m", layers=3)
    (folder / "calib.txt").write_text(word_text(400, seed=5))
    one = _wanda_and_stats(folder)
    out = tmp_path / "rank0.pt"
    two = run_on_gloo_ranks(_wanda_and_stats, folder, out)
    assert set(one) == set(two) and int(two["count"]) == int(one["count"]) == 7 * 12
    assert torch.allclose(two["sq"], one["sq"], rtol=1e-12)
    assert torch.allclose(two["xtx"], one["xtx"], rtol=1e-12, atol=1e-12)
    assert float(two["nll"]) == pytest.approx(float(one["nll"]), rel=1e-9)
    masks = [k for k in one if k.endswith("weight")]
    assert len(masks) == 21
    for k in masks:
        assert torch.equal(one[k], two[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blocks_equal_cpu(tmp_path):
    """--device cuda streams each block to the GPU: scores and Wanda-style statistics equal the CPU run."""
    folder = _save("llama", tmp_path / "m")
    g = _graph(folder)
    ids = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(6))
    name = "model.layers.1.mlp.down_proj.weight"
    res = {}
    for dev in ("cpu", "cuda"):
        eng = Engine(g, device=dev, micro_batch=2)
        for block in eng.blocks(ids, layers=[1]):
            res[dev, "sq"] = block.observe({name: ("sq_norm",)})[name].sq_norm.cpu()
        out = Engine(g, device=dev, micro_batch=2).score(ids)
        res[dev, "nll"] = torch.stack([out.nll[i] for i in range(4)])
    assert torch.allclose(res["cuda", "sq"], res["cpu", "sq"], rtol=1e-4)
    assert torch.allclose(res["cuda", "nll"], res["cpu", "nll"], rtol=1e-4, atol=1e-4)


def test_logit_transforms_follow_the_config_and_unknown_ones_are_refused():
    from surgeon.arch import logit_transform

    x = torch.tensor([-4.0, 0.5, 8.0])
    assert logit_transform({"model_type": "llama"}) is None
    assert torch.allclose(logit_transform({"final_logit_softcapping": 2.0})(x), torch.tanh(x / 2) * 2)
    assert torch.allclose(logit_transform({"text_config": {"logit_scale": 0.25}})(x), x * 0.25)
    assert torch.allclose(logit_transform({"logits_scaling": 4.0})(x), x / 4)
    with pytest.raises(SurgeonError, match="output_multiplier_scale=3"):
        logit_transform({"output_multiplier_scale": 3})


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_logits_of_gathered_positions_equal_the_model_and_carry_gradients(kind, tmp_path):
    """Engine.logits (final norm, chunked head, soft-capping) on the last block's outputs = the whole model's
    logits; the gradient reaches the hidden states (ROME/EMMET's v* backpropagates through it)."""
    from transformers import AutoModelForCausalLM

    folder = _save(kind, tmp_path / kind)
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(2))
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    eng = Engine(_graph(folder), micro_batch=2)
    last = eng.roles.n_layers - 1
    for block in eng.blocks(ids, layers=[last], record=False):
        (mb, x), = list(block.inputs())
        h = block.call(x, mb).detach().requires_grad_(True)
    logits = eng.logits(h[:, [2, 6]].reshape(-1, h.shape[-1]), eng.head_weights())
    torch.testing.assert_close(logits, ref[:, [2, 6]].reshape(-1, ref.shape[-1]), rtol=1e-5, atol=1e-5)
    logits[:, 5].sum().backward()  # (row 0 of a tied head may be the zero padding row)
    assert h.grad is not None and float(h.grad[:, [2, 6]].abs().sum()) > 0 and float(h.grad[:, 0].abs().sum()) == 0


def test_only_rank_zero_prints_the_result(monkeypatch, capsys):
    """Under torchrun every rank runs the CLI; `--json | jq` must see one object (rank 0's)."""
    from surgeon.render import emit

    result = {"output": "/tmp/x", "steps": []}
    monkeypatch.setenv("RANK", "1")
    emit(result, as_json=True)
    emit(result, as_json=False)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    emit(result, as_json=True)
    assert json.loads(capsys.readouterr().out) == result


def test_a_nan_in_a_block_or_a_changed_tensor_is_refused_by_name(tmp_path):
    """A checkpoint tensor is checked once, as it is read; a tensor an earlier step computed (here a Const) is
    checked by the engine; both refusals name the tensor."""
    from conftest import save_tiny_llama
    from safetensors.torch import load_file, save_file

    from surgeon.graph import Const

    folder = save_tiny_llama(tmp_path / "m", layers=2)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(folder / "model.safetensors")
    tensors[name][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    g = _graph(folder)
    rows = torch.randint(0, 128, (2, 8))
    with pytest.raises(SurgeonError, match=name.replace(".", r"\.")):
        Engine(g).score(rows)
    good = _graph(save_tiny_llama(tmp_path / "ok", layers=2))
    bad = good.value(name).clone()
    bad[0, 0] = float("inf")
    good.replace(name, Const(bad))
    with pytest.raises(SurgeonError, match=name.replace(".", r"\.")):
        Engine(good).score(rows)


def test_group_by_length_batches_rows_of_equal_length_and_keeps_results(tmp_path):
    """Rows of lengths 5, 7, 5, 7, 5: consecutive grouping makes 5 micro-batches, grouping by length 2; the
    per-sample NLL and ``logits_at`` are the same (keyed by sample index)."""
    from conftest import save_tiny_llama

    g = _graph(save_tiny_llama(tmp_path / "m", layers=2))
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 128, (n,), generator=gen) for n in (5, 7, 5, 7, 5)]
    plain, grouped = Engine(g), Engine(g, group_by_length=True)
    a, b = plain.score(rows), grouped.score(rows)
    assert len(plain._batches) == 5 and len(grouped._batches) == 2
    for i in range(5):
        torch.testing.assert_close(a.nll[i], b.nll[i], rtol=1e-5, atol=1e-6)
    pos = [[0, 4], [6], [2], [1, 3], [4]]
    for x, y in zip(plain.logits_at(rows, pos), grouped.logits_at(rows, pos)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert [t.shape[0] for t in grouped.logits_at(rows, pos)] == [2, 1, 1, 2, 1]
