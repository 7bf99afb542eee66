"""CheckFree / CheckFree+ (`recover`): a tiny staged llama trained in the test loses a stage; the rebuilt stage is
the exact neighbour average, starts far better than a random re-initialisation, and training resumes towards the
no-failure loss (ALGORITHMS.md §8). Prints the numbers it checks."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgeon.ops.recover.op import Params, apply
from surgeon.ops.recover.stages import aligned_layer, grad_norms_from, stage_partition

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Graph, Load
from surgeon.sources import open_checkpoint
from surgeon.writer import write_graph

VOCAB, HIDDEN, LAYERS, SEQ = 64, 32, 8, 32  # 4 stages × 2 layers
# A random layer drawn at llama's default init (std 0.02) is nearly an identity, so with it the baseline "random
# re-initialisation" equals skipping the stage and says nothing; at std 0.2 the briefly trained network relies on
# every stage and a random stage hurts, as a long-trained one does.
INIT_STD = 0.2
TRAIN_STEPS, RESUME_STEPS, BATCH = 80, 20, 16


# a tiny staged LM trained on a synthetic language ------------------------------------------------------------
def _batch(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences of a noisy deterministic chain: x_{t+1} = perm[x_t] + a shift that depends on x_{t-1}.

    Needs attention to the previous token and an MLP lookup, so the middle layers carry real work."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))
    x = torch.empty(n, SEQ, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
    x[:, 1] = perm[x[:, 0]]
    for t in range(2, SEQ):
        x[:, t] = (perm[x[:, t - 1]] + (x[:, t - 2] % 4)) % VOCAB
    noise = torch.rand(n, SEQ, generator=gen) < 0.05
    x[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=gen)
    return x


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, initializer_range=INIT_STD)
    return LlamaForCausalLM(cfg)


def _train(model, steps: int, *, lr: float = 3e-3, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # fresh optimizer state, as advised
    model.train()
    losses = []
    for _ in range(steps):
        ids = _batch(BATCH, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def _loss(model) -> float:
    ids = _batch(256, torch.Generator().manual_seed(999))
    return model.eval()(input_ids=ids, labels=ids).loss.item()


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # many tiny ops: one thread is faster on a shared machine
    model = _model()
    losses = _train(model, TRAIN_STEPS)
    print(f"\ntraining: loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform {math.log(VOCAB):.3f})")
    folder = tmp_path_factory.mktemp("recover") / "trained"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _drop_stage(src: Path, out: Path, layers: list[int], how: str = "missing") -> Path:
    """A copy of ``src`` whose layers lost their tensors (deleted, NaN or zeros)."""
    shutil.copytree(src, out)
    f = out / "model.safetensors"
    sd = load_file(f)
    for k in list(sd):
        if any(k.startswith(f"model.layers.{l}.") for l in layers):
            if how == "missing":
                del sd[k]
            elif how == "nan":
                sd[k] = torch.full_like(sd[k], float("nan"))
            else:
                sd[k] = torch.zeros_like(sd[k])
    save_file(sd, f, metadata={"format": "pt"})
    return out


def _graph(path: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(path))


def _recover(src: Path, out: Path, **kw) -> Path:
    write_graph(apply(_graph(src), Params(**kw), Context()), out)
    return out


# behaviour ----------------------------------------------------------------------------------------------------
def test_recovered_stage_beats_random_reinit_and_resumes(trained, tmp_path):
    torch.set_num_threads(1)
    broken = _drop_stage(trained, tmp_path / "broken", [4, 5])  # stage 2 of 4
    rec_path = _recover(broken, tmp_path / "rec", stages=4)  # detection finds the missing stage
    report = json.loads((rec_path / "recovery.json").read_text())
    assert report["lost"] == [2] and report["detected"]["2"]["missing"]["count"] == 18
    assert report["stages"][0]["coefficients"] == [0.5, 0.5]

    no_failure = _loss(_load(trained))
    recovered = _load(rec_path)
    rec = _loss(recovered)
    random_init = _model(seed=7)  # stage 2 re-initialised as at the start of training
    baseline = _load(trained)
    for l in (4, 5):
        baseline.model.layers[l].load_state_dict(random_init.model.layers[l].state_dict())
    rand = _loss(baseline)
    copy = _load(trained)
    for j, l in enumerate((4, 5)):
        copy.model.layers[l].load_state_dict(copy.model.layers[2 + j].state_dict())  # stage 1 copied
    copied = _loss(copy)
    _train(recovered, RESUME_STEPS, seed=5)
    _train(baseline, RESUME_STEPS, seed=5)
    after, rand_after = _loss(recovered), _loss(baseline)
    print(f"\nloss: no failure {no_failure:.3f} | recovered {rec:.3f} | copy neighbour {copied:.3f} | "
          f"random re-init {rand:.3f} | uniform {math.log(VOCAB):.3f}; gap closed {(rand - rec) / (rand - no_failure):.2f}")
    print(f"after {RESUME_STEPS} resumed steps: recovered {after:.3f} vs random re-init {rand_after:.3f} "
          f"(no failure {no_failure:.3f})")
    gap = rand - no_failure
    assert gap > 0.1  # the stage matters
    assert rec < rand - 0.25 * gap  # well below random re-initialisation (measured: ~35-40% of the gap closed)
    assert rec < copied + 0.05  # at least as good as copying a neighbour (measured: better)
    assert after < rand_after  # and it stays ahead after resuming
    assert after - no_failure < 0.6 * (rec - no_failure)  # most of the remaining gap closes in a few steps


def test_recovered_tensors_are_the_exact_weighted_average(trained, tmp_path):
    norms = tmp_path / "grads.json"
    norms.write_text(json.dumps({"grad_norms": {"1": 0.3, "3": 0.9}}))
    broken = _drop_stage(trained, tmp_path / "broken", [4, 5], how="nan")
    g = apply(_graph(broken), Params(stages=4, lost=[2], weights=str(norms)), Context())
    src = _graph(trained)
    w1, w3 = 0.3 + 1e-4, 0.9 + 1e-4
    for j in (0, 1):
        for s in ("self_attn.k_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
            want = (w1 * src.value(f"model.layers.{2 + j}.{s}") + w3 * src.value(f"model.layers.{6 + j}.{s}")) / (w1 + w3)
            assert torch.equal(g.value(f"model.layers.{4 + j}.{s}"), want)
    # everything outside the lost stage is still the source's bytes
    assert all(isinstance(g[n], Load) for n in g.names() if not n.startswith(("model.layers.4.", "model.layers.5.")))
    out = tmp_path / "rec"
    write_graph(g, out)
    a, b = load_file(out / "model.safetensors"), load_file(broken / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b if not k.startswith(("model.layers.4.", "model.layers.5.")))
    assert set(a) == set(b)
    rep = json.loads((out / "recovery.json").read_text())
    assert rep["stages"][0]["coefficients"] == pytest.approx([w1 / (w1 + w3), w3 / (w1 + w3)])


def test_python_face_writes_recovery_json_and_card_note(trained, tmp_path):
    from surgeon.api import run_op

    broken = _drop_stage(trained, tmp_path / "broken", [2, 3])
    res = run_op("recover", str(broken), output=str(tmp_path / "rec"), stages=4, device="cpu")
    out = Path(res["output"])
    card = (out / "README.md").read_text()
    assert "synthetic" in card and "× 1.1" in card
    rep = json.loads((out / "recovery.json").read_text())
    assert rep["lost"] == [1] and rep["advice"]["lr_factor"] == 1.1
    assert json.loads((out / "surgeon.json").read_text())["steps"][0]["info"]["recover"]["lost"] == [1]


def test_checkfree_plus_copies_edge_stages(trained, tmp_path):
    broken = _drop_stage(trained, tmp_path / "broken", [6, 7])  # last stage
    with pytest.raises(SurgeonError, match="edge stage .*--plus"):
        apply(_graph(broken), Params(stages=4), Context())  # plain CheckFree without an earlier copy
    g = apply(_graph(broken), Params(stages=4, plus=True), Context())
    src = _graph(trained)
    for j in (0, 1):
        assert torch.equal(g.value(f"model.layers.{6 + j}.self_attn.q_proj.weight"),
                           src.value(f"model.layers.{4 + j}.self_attn.q_proj.weight"))
    first = apply(_graph(_drop_stage(trained, tmp_path / "b0", [0, 1])), Params(stages=4, plus=True), Context())
    assert torch.equal(first.value("model.layers.1.mlp.up_proj.weight"), src.value("model.layers.3.mlp.up_proj.weight"))


# detection and refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["missing", "nan", "zero"])
def test_damaged_stage_is_detected_and_reported(trained, tmp_path, how):
    broken = _drop_stage(trained, tmp_path / "broken", [2, 3], how=how)
    g = apply(_graph(broken), Params(stages=4), Context())
    rep = json.loads(g.extra_files["recovery.json"])
    reason = {"missing": "missing", "nan": "nonfinite", "zero": "zero"}[how]
    assert rep["lost"] == [1] and list(rep["detected"]["1"]) == [reason]
    assert torch.isfinite(g.value("model.layers.2.self_attn.q_proj.weight")).all()


def test_damage_outside_lost_is_refused_and_intact_lost_is_warned(trained, tmp_path):
    broken = _drop_stage(trained, tmp_path / "broken", [2], how="nan")
    with pytest.raises(SurgeonError, match="stage\\(s\\) 1 .*not in --lost"):
        apply(_graph(broken), Params(stages=4, lost=[2]), Context())
    g = apply(_graph(trained), Params(stages=4, lost=[2]), Context())
    assert "look intact" in json.loads(g.extra_files["recovery.json"])["warnings"][0]
    with pytest.raises(SurgeonError, match="none detected"):
        apply(_graph(trained), Params(stages=4), Context())


def test_adjacent_losses_are_refused(trained, tmp_path):
    broken = _drop_stage(trained, tmp_path / "broken", [2, 3, 4, 5])
    with pytest.raises(SurgeonError, match="stages 1 and 2 are both lost"):
        apply(_graph(broken), Params(stages=4), Context())
    # CheckFree+: stage 1 copies stage 0 and stage 2 copies stage 3; neither source is lost
    g = apply(_graph(broken), Params(stages=4, plus=True), Context())
    src = _graph(trained)
    assert torch.equal(g.value("model.layers.3.mlp.up_proj.weight"), src.value("model.layers.1.mlp.up_proj.weight"))
    assert torch.equal(g.value("model.layers.4.mlp.up_proj.weight"), src.value("model.layers.6.mlp.up_proj.weight"))
    with pytest.raises(SurgeonError, match="stages 0 and 1 are both lost"):
        apply(_graph(_drop_stage(trained, tmp_path / "b01", [0, 1, 2, 3])), Params(stages=4, plus=True), Context())


def _reference_checkfree_plus(stages: list[dict[str, torch.Tensor]], i: int, grad_norms: list[float]) -> dict:
    """gensyn-ai/CheckFree ``convergence_training.py``, mode ``ours-grad-avg`` (CheckFree+ runs swap stages 1<->2
    and n-1<->n on odd micro-batches). ``stages[0]`` holds the embeddings and never fails; transformer stages are
    1..n. The reference hard-codes n = 6 (stages 5 and 6); here n = len(stages) - 1."""
    n = len(stages) - 1
    if i == n:
        return dict(stages[n - 1])
    elif i == 1:
        return dict(stages[2])
    elif i == 2:
        return dict(stages[1])
    elif i == n - 1:
        return dict(stages[n])
    m1, m2 = stages[i + 1], stages[i - 1]
    alpha = abs(grad_norms[i + 1]) + 0.0001
    beta = abs(grad_norms[i - 1]) + 0.0001
    return {key: (alpha * m1[key] + beta * m2[key]) / (alpha + beta) for key in m1}


@pytest.mark.parametrize("lost", range(8))
def test_checkfree_plus_matches_the_reference_code(trained, tmp_path, lost):
    # 8 stages of one layer each; reference stage i = our stage i - 1
    sd = load_file(trained / "model.safetensors")
    suffixes = sorted(k.removeprefix("model.layers.0.") for k in sd if k.startswith("model.layers.0."))
    stages = [{}] + [{s: sd[f"model.layers.{l}.{s}"] for s in suffixes} for l in range(8)]
    norms = [0.0] + [0.1 * (k + 1) for k in range(8)]  # reference indexing: norms[i] of transformer stage i
    (tmp_path / "g.json").write_text(json.dumps(norms[1:]))
    want = _reference_checkfree_plus(stages, lost + 1, norms)
    g = apply(_graph(_drop_stage(trained, tmp_path / "b", [lost])),
              Params(stages=8, plus=True, weights=str(tmp_path / "g.json")), Context())
    for s in suffixes:
        assert torch.allclose(g.value(f"model.layers.{lost}.{s}"), want[s], atol=1e-6), s


def test_plain_checkfree_restores_an_edge_from_an_earlier_copy(trained, tmp_path):
    # the earlier copy: the trained model a few steps before (here: perturbed), as the reference's periodic copy
    earlier = tmp_path / "earlier"
    shutil.copytree(trained, earlier)
    sd = load_file(earlier / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    sd = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    save_file(sd, earlier / "model.safetensors", metadata={"format": "pt"})
    broken = _drop_stage(trained, tmp_path / "broken", [6, 7])
    with pytest.raises(SurgeonError, match="edge stage .*--edge-copy"):
        apply(_graph(broken), Params(stages=4), Context())
    g = apply(_graph(broken), Params(stages=4, edge_copy=str(earlier)), Context())
    current = load_file(trained / "model.safetensors")
    for k in current:  # the reference: m3 = (1·checkpoints_last + 0·stage) / 1 for the last stage
        want = sd[k] if k.startswith(("model.layers.6.", "model.layers.7.")) else current[k]
        assert torch.equal(g.value(k), want), k
    rep = json.loads(g.extra_files["recovery.json"])
    assert rep["stages"][0]["mode"].startswith("earlier copy") and "stale" in rep["warnings"][0]
    with pytest.raises(ValueError, match="exclusive"):
        Params(stages=4, plus=True, edge_copy=str(earlier))
    middle = apply(_graph(_drop_stage(trained, tmp_path / "b2", [2, 3])), Params(stages=4, edge_copy=str(earlier)),
                   Context())
    assert "unused" in json.loads(middle.extra_files["recovery.json"])["warnings"][0]
    del sd["model.layers.7.mlp.up_proj.weight"]
    save_file(sd, earlier / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match="has no tensor model.layers.7.mlp.up_proj.weight"):
        apply(_graph(broken), Params(stages=4, edge_copy=str(earlier)), Context())


def test_lost_embedding_needs_a_replica(trained, tmp_path):
    out = tmp_path / "noembed"
    shutil.copytree(trained, out)
    sd = load_file(out / "model.safetensors")
    del sd["model.embed_tokens.weight"]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match="embed tensor model.embed_tokens.weight is missing and has no intact"):
        apply(_graph(out), Params(stages=4, lost=[1]), Context())
    # a checkpoint trained with tied embeddings that still stores the head carries the replica
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    g = apply(_graph(out), Params(stages=4, lost=[1]), Context())
    assert torch.equal(g.value("model.embed_tokens.weight"), _graph(trained).value("lm_head.weight"))


def test_partition_and_alignment_rules():
    assert stage_partition(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_partition(7, ranges=["0-2", "3-4", "5-6"]) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(SurgeonError, match="do not split equally"):
        stage_partition(8, 3)
    with pytest.raises(SurgeonError, match="should start at layer 3"):
        stage_partition(8, ranges=["0-2", "4-7"])
    with pytest.raises(SurgeonError, match="cover layers 0-5"):
        stage_partition(8, ranges=["0-2", "3-5"])
    assert [aligned_layer(j, 2, 2) for j in range(2)] == [0, 1]
    assert [aligned_layer(j, 3, 2) for j in range(3)] == [0, 1, 1]  # centres 1/6, 1/2, 5/6 of the stage
    assert [aligned_layer(j, 2, 4) for j in range(2)] == [1, 3]


def test_unequal_stages_average_by_relative_position(trained, tmp_path):
    broken = _drop_stage(trained, tmp_path / "broken", [3, 4, 5])
    g = apply(_graph(broken), Params(stage_layers="0-2,3-5,6-7"), Context())
    rep = json.loads(g.extra_files["recovery.json"])
    assert rep["stages"][0]["layer_sources"] == [{"layer": 3, "from": [0, 6]}, {"layer": 4, "from": [1, 7]},
                                                 {"layer": 5, "from": [2, 7]}]
    src = _graph(trained)
    want = (src.value("model.layers.1.mlp.gate_proj.weight") + src.value("model.layers.7.mlp.gate_proj.weight")) / 2
    assert torch.equal(g.value("model.layers.4.mlp.gate_proj.weight"), want)


def test_weights_json_is_validated(trained, tmp_path):
    with pytest.raises(SurgeonError, match="w.json: stage 1: gradient norm must be a finite number"):
        grad_norms_from([1.0, -2.0], 4, "w.json")
    with pytest.raises(SurgeonError, match="stage 9 out of range"):
        grad_norms_from({"9": 1.0}, 4, "w.json")
    assert grad_norms_from({"grad_norms": [0.5, 1.0, 0.0, 2.0]}, 4, "w.json") == {0: 0.5, 1: 1.0, 2: 0.0, 3: 2.0}
    p = tmp_path / "w.json"
    p.write_text("[1.0, 2.0")  # the file is read through the Context: one-line errors naming --weights
    with pytest.raises(SurgeonError, match="--weights: .*w.json: invalid JSON"):
        apply(_graph(trained), Params(stages=4, lost=[2], weights=str(p)), Context())
    with pytest.raises(SurgeonError, match="--weights: .*nope.json does not exist"):
        apply(_graph(trained), Params(stages=4, lost=[2], weights=str(tmp_path / "nope.json")), Context())


def test_missing_neighbour_norm_and_bad_params(trained, tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"1": 1.0}))
    with pytest.raises(SurgeonError, match="no gradient norm for stage 3"):
        apply(_graph(trained), Params(stages=4, lost=[2], weights=str(p)), Context())
    with pytest.raises(ValueError, match="exactly one of stages"):
        Params()
    with pytest.raises(ValueError, match="exactly one of stages"):
        Params(stages=4, stage_layers="0-3,4-7")
    with pytest.raises(ValueError, match="inclusive ranges"):
        Params(stage_layers="0..3")
    with pytest.raises(SurgeonError, match="partition has 4 stages"):
        apply(_graph(trained), Params(stages=4, lost=[4]), Context())


def test_layout_of_a_checkpoint_with_a_missing_stage(trained, tmp_path):
    from surgeon.arch.gaps import roles_with_gaps

    g = _graph(_drop_stage(trained, tmp_path / "lost", [2, 3]))
    gapped = roles_with_gaps(g.config, g.names())
    assert gapped.template == "model.layers.{i}."
    assert [bool(p) for p in gapped.present] == [True, True, False, False, True, True, True, True]
    assert set(gapped.suffixes) == gapped.present[0] and "mlp.up_proj.weight" in gapped.suffixes
    assert gapped.roles.n_layers == LAYERS and gapped.global_name("final_norm") == "model.norm.weight"
    # the run's arch overrides reach recover: a wrong layer template is reported, not ignored
    with pytest.raises(SurgeonError, match="recover: .*no tensor starts with the layer prefix"):
        apply(g, Params(stages=4, lost=[1]), Context(arch={"layers": "model.blocks.{i}."}))
