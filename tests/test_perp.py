"""retrain.perp: MaskLoRA/ScaleLoRA merges are exact and keep zeros; PERP recovers most of the pruning loss."""
from __future__ import annotations

import json

import pytest
import torch
from surgeon.ops.prune import magnitude
from surgeon.ops.retrain import perp
from surgeon.ops.retrain.adapters import MaskLoRA, ScaleLoRA, attach, detach, merged_weight
from surgeon.ops.retrain.perp import module_of
from test_prune_helpers import graph_loss, heldout_loss, task_model_fixture  # noqa: F401  (fixture)

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.pipeline import validate_step
from surgeon.sources import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def _pruned_module(path, sparsity=0.5):
    g = magnitude.apply(Graph.from_checkpoint(open_checkpoint(path)), magnitude.Params(sparsity=sparsity), Context())
    return g, Context().module(g)


def _linears(g):
    return [n for n in g.names() if ".layers." in n and n.endswith("proj.weight")]


@pytest.mark.parametrize("kind", ["mask", "scale"])
def test_adapter_merge_keeps_zeros_and_equals_trained_forward(tiny_llama, kind):
    g, model = _pruned_module(tiny_llama)
    names = _linears(g)
    attached = [attach(*module_of(model, n)[:2], kind, 4, 8.0) for n in names]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every adapter far from its init
        for a in attached:
            for q in a.adapter.parameters():
                q.add_(torch.randn(q.shape, generator=gen) * 0.3)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    for n, a in zip(names, attached):
        w0 = a.module.parametrizations[a.leaf].original.detach().clone()
        w = merged_weight(a)
        assert int(((w0 == 0) & (w != 0)).sum()) == 0  # zeros stay zero
        assert int((w != w0).sum()) > 0.4 * w0.numel()  # and the rest did change
        detach(a, w)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert float((merged - trained).abs().max()) < 1e-5


def test_scalelora_is_identity_at_init_and_masklora_starts_at_zero():
    w = torch.randn(12, 20)
    w[w.abs() < 0.5] = 0
    assert torch.allclose(ScaleLoRA(w, 4)(w), w, atol=1e-6)
    assert torch.equal(MaskLoRA(w, 4, 8.0)(w), w)


def test_perp_recovers_most_of_the_pruning_loss(task_model, tmp_path):
    """Behaviour: a trained tiny model pruned 60 % loses its task; PERP brings most of it back."""
    from surgeon.api import run_op

    data, held = task_model.parent / "train.txt", task_model.parent / "heldout.txt"
    dense = heldout_loss(task_model, held)
    run_op("prune.magnitude", str(task_model), output=str(tmp_path / "pruned"), sparsity=0.6, device="cpu")
    pruned = heldout_loss(tmp_path / "pruned", held)
    res = run_op("retrain.perp", str(tmp_path / "pruned"), output=str(tmp_path / "perp"), device="cpu",
                 data=str(data), seqlen=24, steps=60, lr=5e-3, batch_size=8, rank=4, alpha=8)
    after = heldout_loss(tmp_path / "perp", held)
    recovered = (pruned - after) / (pruned - dense)
    print(f"\nheld-out NLL: dense {dense:.3f}  magnitude-60% {pruned:.3f}  +PERP {after:.3f}  "
          f"recovered {recovered:.0%}")
    assert dense < 0.35  # the task was learned
    assert pruned > dense + 0.2  # pruning hurt
    assert recovered > 0.6  # PERP brought most of it back
    info = res["steps"][0]["info"]
    assert 0 < info["trainable_fraction"] < 0.3
    # zeros survived the merge, exactly where they were
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "pruned" / "model.safetensors"), load_file(tmp_path / "perp" / "model.safetensors")
    for n in a:
        if ".layers." in n and n.endswith("proj.weight"):
            assert torch.equal(a[n] == 0, b[n] == 0), n
    assert "sparsity_config" not in (tmp_path / "perp" / "config.json").read_text()
    prov = json.loads((tmp_path / "perp" / "surgeon.json").read_text())
    assert prov["steps"][0]["info"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_reconstruct_mode_lowers_block_error_in_one_run(task_model):
    g = Graph.from_checkpoint(open_checkpoint(task_model))
    data = str(task_model.parent / "train.txt")
    ctx = Context()
    g1 = magnitude.apply(g, magnitude.Params(sparsity=0.6), ctx)
    before = graph_loss(g1, task_model.parent / "heldout.txt")
    ctx.step_info = {}
    g2 = perp.apply(g1, perp.Params(data=data, mode="reconstruct", steps=40, lr=5e-3, seqlen=24, batch_size=8,
                                    rank=4, alpha=8), ctx)
    info = ctx.step_info
    after = graph_loss(g2, task_model.parent / "heldout.txt")
    print(f"\nreconstruct: block error {info['block_error_before']} -> {info['block_error_after']}; "
          f"held-out NLL {before:.3f} -> {after:.3f}")
    assert all(a < b for a, b in zip(info["block_error_after"], info["block_error_before"]))
    assert after < before
    for n in _linears(g):
        assert torch.equal(g1.value(n) == 0, g2.value(n) == 0)


def test_lora_none_trains_norms_only_and_leaves_linears_lazy(task_model):
    g = magnitude.apply(Graph.from_checkpoint(open_checkpoint(task_model)), magnitude.Params(sparsity=0.5),
                        Context())
    ctx = Context()
    g2 = perp.apply(g, perp.Params(data=str(task_model.parent / "train.txt"), lora="none", steps=3, seqlen=24,
                                   head_lora=False), ctx)
    assert all(g2[n] is g[n] for n in _linears(g))
    changed = [n for n in g.names() if g2[n] is not g[n]]
    assert changed and all("norm" in n for n in changed)
    assert ctx.step_info["trainable_parameters"] == sum(g[n].shape[0] for n in changed)


def test_bad_input_is_named(tiny_llama):
    with pytest.raises(SurgeonError, match="data"):
        validate_step("retrain.perp", {})
    with pytest.raises(SurgeonError, match="nothing to train"):
        validate_step("retrain.perp", {"data": "x.txt", "lora": "none", "train_norms": False,
                                       "train_biases": False, "head_lora": False})
    with pytest.raises(SurgeonError):
        validate_step("retrain.perp", {"data": "x.txt", "seqlen": 4096})
    g = Graph.from_checkpoint(open_checkpoint(tiny_llama))
    with pytest.raises(SurgeonError, match="dense weights"):
        perp.apply(g, perp.Params(data="model:2", mode="reconstruct"), Context())


def test_prune_retrain_eval_recipe_chain(task_model, tmp_path):
    """recipes/prune-perp.yaml as a user runs it, pointed at the tiny model with --set overrides."""
    from pathlib import Path

    import yaml

    from surgeon.recipe import execute_recipe, load_recipe

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "prune-perp.yaml").read_text())
    d = task_model.parent
    raw["model"], raw["output"] = str(task_model), str(tmp_path / "out")
    raw["steps"][1]["retrain.perp"].update(data=str(d / "train.txt"), steps=30, seqlen=24, rank=4, alpha=8, lr=5e-3)
    raw["steps"][2]["eval"].update(perplexity=str(d / "heldout.txt"), seqlen=24)
    r = load_recipe(raw)  # (`--set steps.1.retrain.perp.x=` cannot address dotted op names yet)
    res = execute_recipe(r, quiet=True, device="cpu")
    assert [s["op"] for s in res["steps"]] == ["prune.magnitude", "retrain.perp", "eval"]
    ppl = json.dumps(res["results"])
    assert "perplexity" in ppl
    card = (tmp_path / "out" / "README.md").read_text()
    assert "retrain.perp" in card


def _reference_trainable_count(g: Graph, names: list[str], rank: int) -> int:
    """ZIB-IOL/PERP SelectivePEFT defaults (peft_use_bias, peft_use_ln, peft_use_lm_head, peft_use_lora): a rank-r
    LoRA (r·(in + out)) on every pruned block linear and on lm_head, plus every norm parameter and bias."""
    head = "lm_head.weight" if "lm_head.weight" in g.names() else "model.embed_tokens.weight"
    lora = sum(rank * (g[n].shape[0] + g[n].shape[1]) for n in names + [head])
    return lora + sum(g[n].shape[0] for n in g.names() if "norm" in n or n.endswith(".bias"))


@pytest.mark.parametrize("tied", [False, True])
def test_head_lora_like_the_reference(task_model, tmp_path, tied):
    import shutil

    from safetensors.torch import load_file, save_file

    src = task_model
    if tied:  # the same trained model with the head tied to the embedding (as SmolLM2)
        src = tmp_path / "tied"
        shutil.copytree(task_model, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg["tie_word_embeddings"] = True
        (src / "config.json").write_text(json.dumps(cfg))
        sd = load_file(src / "model.safetensors")
        del sd["lm_head.weight"]
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    data = str(task_model.parent / "train.txt")
    g = magnitude.apply(Graph.from_checkpoint(open_checkpoint(src)), magnitude.Params(sparsity=0.5), Context())
    names = _linears(g)
    ctx = Context()
    g2 = perp.apply(g, perp.Params(data=data, steps=4, lr=5e-3, seqlen=24, batch_size=8, rank=4, alpha=8), ctx)
    assert ctx.step_info["trainable_parameters"] == _reference_trainable_count(g, names, 4)
    assert ctx.step_info["head_lora"] == {"tensor": head, "tied": tied}
    delta = (g2.value(head) - g.value(head)).double()
    sv = torch.linalg.svdvals(delta)
    assert float(sv[0]) > 1e-4 and float(sv[4]) < 1e-6 * float(sv[0])  # a trained rank-4 update, merged densely
    if not tied:
        assert torch.equal(g2.value("model.embed_tokens.weight"), g.value("model.embed_tokens.weight"))
    # reconstruct mode skips the head (the reference: "not pruned. Skipping."); head_lora=False leaves it alone
    g3 = perp.apply(g, perp.Params(data=data, steps=2, seqlen=24, rank=4, alpha=8, mode="reconstruct"), Context())
    g4 = perp.apply(g, perp.Params(data=data, steps=2, seqlen=24, rank=4, alpha=8, head_lora=False), Context())
    for gx in (g3, g4):
        assert gx[head] is g[head]


def test_bf16_retrain_trains_fp32_parameters_and_recovers_like_fp32(task_model):
    """dtype=bfloat16: the frozen model in bf16 under autocast, trained parameters in fp32; the held-out loss
    recovers about as much as the fp32 run (same seed, same steps) and the zeros survive."""
    g = Graph.from_checkpoint(open_checkpoint(task_model))
    held = task_model.parent / "heldout.txt"
    g1 = magnitude.apply(g, magnitude.Params(sparsity=0.6), Context())
    pruned = graph_loss(g1, held)
    kw = {"data": str(task_model.parent / "train.txt"), "seqlen": 24, "steps": 12, "lr": 5e-3, "batch_size": 8,
          "rank": 4, "alpha": 8}
    ctx = Context()
    g_bf16 = perp.apply(g1, perp.Params(dtype="bfloat16", **kw), ctx)
    assert ctx.step_info["dtype"] == "bfloat16"
    g_fp32 = perp.apply(g1, perp.Params(**kw), Context())
    after_bf16, after_fp32 = graph_loss(g_bf16, held), graph_loss(g_fp32, held)
    print(f"\nheld-out NLL: pruned {pruned:.3f}  PERP fp32 {after_fp32:.3f}  PERP bf16 {after_bf16:.3f}")
    assert after_fp32 < pruned and after_bf16 < pruned
    assert (pruned - after_bf16) > 0.8 * (pruned - after_fp32)
    for n in _linears(g):
        assert torch.equal(g1.value(n) == 0, g_bf16.value(n) == 0)
        assert g_bf16[n].dtype == g1[n].dtype
