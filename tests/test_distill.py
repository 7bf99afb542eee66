"""retrain.distill: the KD loss against literal references, distillation of a tied trained tiny Llama toward its
original, the three output forms loading and agreeing, and one-line errors for bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from surgeon.ops.retrain.kd import TopK, kd_loss
from test_prune_helpers import WINDOW, task_model_fixture  # noqa: F401  (fixture)

import surgeon
from surgeon.api import run_op
from surgeon.errors import SurgeonError
from surgeon.pipeline import RunOptions, run_steps
from tests.conftest import save_tiny_llama

STEPS = {"seqlen": WINDOW, "steps": 40, "blockwise_epochs": 0, "lr": 5e-3, "batch_size": 8, "device": "cpu", "quiet": True}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


# --- the loss ---------------------------------------------------------------------------------------------------
def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kd_loss_equals_torch_kl_div_on_our_own_softmax(tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 11, generator=g) * 3, torch.randn(3, 7, 11, generator=g) * 3
    p_t = _softmax(t / tau).reshape(-1, 11)
    log_p_s = torch.log(_softmax(s / tau)).reshape(-1, 11)
    reference = F.kl_div(log_p_s, p_t, reduction="batchmean") * tau**2
    assert torch.allclose(kd_loss(s, t, tau), reference, rtol=1e-5, atol=1e-6)


def test_kd_loss_top_k_is_the_renormalised_teacher_against_the_full_student():
    g = torch.Generator().manual_seed(1)
    s, t, tau, k = torch.randn(2, 5, 13, generator=g), torch.randn(2, 5, 13, generator=g), 1.5, 4
    total = 0.0
    for b in range(2):
        for i in range(5):
            order = sorted(range(13), key=lambda v: -float(t[b, i, v]))[:k]
            z = [float(t[b, i, v]) / tau for v in order]
            p = [2.718281828459045 ** (x - max(z)) for x in z]
            p = [x / sum(p) for x in p]
            log_ps = torch.log(_softmax(s[b, i] / tau))
            total += sum(pj * (torch.log(torch.tensor(pj)) - log_ps[v]) for pj, v in zip(p, order))
    reference = total / 10 * tau**2
    vals, idx = torch.topk(t, k, dim=-1)
    assert abs(float(kd_loss(s, TopK(vals, idx), tau)) - float(reference)) < 1e-5
    full_k = TopK(*torch.topk(t, 13, dim=-1))  # k = vocabulary: the exact loss
    assert torch.allclose(kd_loss(s, full_k, tau), kd_loss(s, t, tau), atol=1e-6)


# --- the teacher on the engine -------------------------------------------------------------------------------
def _engine(folder: Path, micro_batch: int):
    from surgeon.engine import Engine
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    return Engine(Graph.from_checkpoint(open_checkpoint(folder)), micro_batch=micro_batch)


@pytest.mark.parametrize(("tie", "micro_batch", "chunk"), [(False, 3, 16), (True, 1, 8192)])
def test_engine_top_k_table_equals_torch_topk_of_the_whole_module(tmp_path, monkeypatch, tie, micro_batch, chunk):
    """Blocks once, then the head a vocabulary slice at a time (16 of 200 rows: the running top-k merge) and a
    few positions at a time: the literal torch.topk of the whole module's logits (values 1e-5, same ids)."""
    from surgeon.engine import core, outputs

    folder = save_tiny_llama(tmp_path / "m", layers=3, hidden=32, vocab=200, tie=tie)
    windows = torch.randint(0, 200, (5, 12), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(core, "VOCAB_CHUNK", chunk)  # the head's slices (Engine.logit_slices)
    values, indices = outputs.top_logits(_engine(folder, micro_batch), windows, 6, rows_per_call=7)
    ref = torch.topk(_logits(_hf(folder), windows), 6, dim=-1)
    assert torch.equal(torch.stack(indices), ref.indices)
    assert torch.allclose(torch.stack(values), ref.values, rtol=0, atol=1e-5)


def test_engine_teacher_logits_equal_the_whole_module(tmp_path):
    """Exact KL: the kept last hidden states through the engine's head give the module's logits, any windows."""
    from surgeon.engine.outputs import last_hidden

    folder = save_tiny_llama(tmp_path / "m", layers=3, hidden=32, vocab=200)
    windows = torch.randint(0, 200, (6, 10), generator=torch.Generator().manual_seed(4))
    hidden = last_hidden(_engine(folder, 4), windows)
    ref = _logits(_hf(folder), windows)
    for idx in ([5, 0, 2], [4], [1, 3]):
        assert torch.allclose(hidden.logits(idx), ref[idx], rtol=0, atol=1e-5)


# --- behaviour on a trained tiny model ----------------------------------------------------------------------------
def _heldout(folder: Path) -> torch.Tensor:
    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    g = Graph.from_checkpoint(open_checkpoint(folder))
    return Context().tokens(str(folder.parent / "heldout.txt"), g, seqlen=WINDOW)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _kl_and_nll(student, teacher_logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """Independent measures: KL(teacher ‖ student) per position (F.kl_div) and the mean next-token NLL."""
    s = _logits(student, ids)
    kl = F.kl_div(F.log_softmax(s, -1).reshape(-1, s.shape[-1]), F.softmax(teacher_logits, -1).reshape(-1, s.shape[-1]),
                  reduction="batchmean")
    nll = F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    return float(kl), float(nll)


@pytest.fixture(scope="module")
def tied(task_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "tied"
    run_op("tie", str(task_model), output=str(out), loops=2, rank=2, untie_norms=True, device="cpu")
    return out


@pytest.fixture(scope="module")
def distilled(task_model, tied) -> Path:
    out = tied.parent / "distilled"
    run_op("retrain.distill", str(tied), output=str(out), teacher=str(task_model),
           data=str(task_model.parent / "train.txt"), **STEPS)
    return out


def test_distillation_moves_the_tied_model_to_its_teacher(task_model, tied, distilled):
    ids = _heldout(task_model)
    teacher = _hf(task_model)
    t_logits = _logits(teacher, ids)
    _, nll_teacher = _kl_and_nll(teacher, t_logits, ids)
    kl_before, nll_before = _kl_and_nll(surgeon.load_recursive(str(tied)), t_logits, ids)
    kl_after, nll_after = _kl_and_nll(surgeon.load_recursive(str(distilled)), t_logits, ids)
    print(f"\nheld-out: teacher NLL {nll_teacher:.3f}; tied KL {kl_before:.3f} NLL {nll_before:.3f}; "
          f"distilled KL {kl_after:.3f} NLL {nll_after:.3f}")
    assert kl_after < 0.2 * kl_before
    assert abs(nll_after - nll_teacher) < 0.3 * abs(nll_before - nll_teacher)
    report = json.loads((distilled / "recursion.json").read_text())["distill"]
    assert report["perplexity_after"] < report["perplexity_before"] and report["kl_last"] < report["kl_first"]
    assert report["curve"][0][0] == 0 and report["curve"][-1][0] == STEPS["steps"]


def test_top_k_targets_distill_too(task_model, tied, tmp_path):
    """top_k: the teacher's targets are computed once (then the teacher is freed); KL still falls."""
    res = run_op("retrain.distill", str(tied), output=str(tmp_path / "o"), teacher=str(task_model), top_k=4,
                 teacher_batch=3, data=str(task_model.parent / "train.txt"), **{**STEPS, "steps": 20})
    info = res["steps"][0]["info"]["distill"]
    assert info["top_k"] == 4 and info["kl_last"] < 0.5 * info["kl_first"]
    assert info["perplexity_after"] < info["perplexity_before"]


def _module_teacher(folder: Path, calls: list):
    """The teacher as it was before the engine, literally: the whole fp32 module, its held-out perplexity from
    F.cross_entropy, and per step its logits (or their torch.topk, computed once)."""
    def teacher(_graph, windows, held, _schedule, p, _ctx):
        calls.append(p.top_k)
        model = _hf(folder)
        lg = _logits(model, held)
        ppl = math.exp(float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), held[:, 1:].reshape(-1))))
        if p.top_k:
            table = torch.topk(_logits(model, windows), p.top_k, dim=-1)
            return round(ppl, 4), lambda idx: TopK(table.values[idx], table.indices[idx])
        return round(ppl, 4), lambda idx: _logits(model, windows[idx])

    return teacher


@pytest.mark.parametrize("top_k", [0, 4])
def test_engine_teacher_gives_the_loss_curve_of_the_whole_module_teacher(task_model, tied, tmp_path, monkeypatch,
                                                                          top_k):
    """10 steps with the engine's teacher vs the whole-module teacher: same teacher perplexity (1e-5 relative,
    the report's 4 decimals), per-step KL within 1e-4 relative, held-out curve within 1e-4 relative (measured on
    this tiny model: identical to the last bit, both exact and top-k)."""
    import surgeon.ops.retrain.distill as distill_op

    losses = {}
    real = distill_op.distill

    def run(name: str) -> dict:
        def keep(*a, **kw):
            out = real(*a, **kw)
            losses[name] = out[0]
            return out

        monkeypatch.setattr(distill_op, "distill", keep)
        res = run_op("retrain.distill", str(tied), output=str(tmp_path / name), teacher=str(task_model),
                     top_k=top_k, data=str(task_model.parent / "train.txt"), **{**STEPS, "steps": 10})
        return res["steps"][0]["info"]["distill"]

    on_engine = run("engine")
    calls: list = []
    monkeypatch.setattr(distill_op, "engine_teacher", _module_teacher(task_model, calls))
    whole = run("module")
    assert calls == [top_k]
    assert abs(on_engine["teacher_perplexity"] - whole["teacher_perplexity"]) <= 1e-5 * whole["teacher_perplexity"]
    assert len(losses["engine"]) == 10 and losses["engine"][-1] < losses["engine"][0]
    for a, b in zip(losses["engine"], losses["module"]):
        assert abs(a - b) <= 1e-4 * b, (losses["engine"], losses["module"])
    for (s1, p1), (s2, p2) in zip(on_engine["curve"], whole["curve"]):
        assert s1 == s2 and abs(p1 - p2) <= 1e-4 * p2


def test_compact_output_keeps_the_layout_and_shares_storage(tied, distilled):
    from safetensors.torch import load_file

    before, after = load_file(tied / "model.safetensors"), load_file(distilled / "model.safetensors")
    assert set(before) == set(after)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any("shared_layers" in n for n in changed) and any("lora_A" in n for n in changed)
    assert not any("embed_tokens" in n for n in changed)  # embeddings and head never train
    model = surgeon.load_recursive(str(distilled))
    q0 = model.model.layers[0].self_attn.q_proj.base.weight
    assert q0.data_ptr() == model.model.layers[1].self_attn.q_proj.base.weight.data_ptr()


def _in_run(task_model: Path, out: Path, **tie: object) -> Path:
    steps = [("tie", {"loops": 2, "rank": 2, "untie_norms": True, **tie}),
             ("retrain.distill", {"data": str(task_model.parent / "train.txt"),
                                  **{k: v for k, v in STEPS.items() if k not in ("device", "quiet")}})]
    run_steps({"m": str(task_model)}, steps, RunOptions(output=str(out), device="cpu", quiet=True))
    return out


def test_every_form_loads_and_computes_the_same_model(task_model, tied, distilled, tmp_path):
    """compact (from disk, --teacher), materialised and tied-base + PEFT (tie and distill in one run, the run's
    input as the default teacher) train the same parameters from the same start: the same logits."""
    from peft import PeftModel

    ids = _heldout(task_model)
    compact = _logits(surgeon.load_recursive(str(distilled)), ids)
    materialized = _logits(_hf(_in_run(task_model, tmp_path / "mat", materialize=True)), ids)
    base = _in_run(task_model, tmp_path / "tb", tied_base=True)
    peft = _logits(PeftModel.from_pretrained(_hf(base), str(base / "lora")), ids)
    compact_in_run = _logits(surgeon.load_recursive(str(_in_run(task_model, tmp_path / "c"))), ids)
    assert float((compact_in_run - compact).abs().max()) < 1e-4
    assert float((materialized - compact).abs().max()) < 1e-4
    assert float((peft - compact).abs().max()) < 1e-4
    assert float((compact - _logits(surgeon.load_recursive(str(tied)), ids)).abs().max()) > 0.1


def test_tied_base_from_disk_keeps_its_form(task_model, tmp_path):
    from peft import PeftModel

    run_op("tie", str(task_model), output=str(tmp_path / "tb"), loops=2, rank=2, tied_base=True, device="cpu")
    run_op("retrain.distill", str(tmp_path / "tb"), output=str(tmp_path / "out"), teacher=str(task_model),
           data=str(task_model.parent / "train.txt"), **{**STEPS, "steps": 5})
    assert "recursion" not in json.loads((tmp_path / "out" / "config.json").read_text())
    ids = _heldout(task_model)
    model = PeftModel.from_pretrained(_hf(tmp_path / "out"), str(tmp_path / "out" / "lora"))
    before = PeftModel.from_pretrained(_hf(tmp_path / "tb"), str(tmp_path / "tb" / "lora"))
    assert float((_logits(model, ids) - _logits(before, ids)).abs().max()) > 1e-3


# --- bad inputs -----------------------------------------------------------------------------------------------
def _one_line_error(match: str, *args, **kw) -> None:
    with pytest.raises(SurgeonError, match=match) as e:
        run_op(*args, **kw)
    assert "\n" not in str(e.value)


def test_a_model_that_was_never_tied_is_refused(task_model, tmp_path):
    _one_line_error("not a tied model", "retrain.distill", str(task_model), output=str(tmp_path / "o"),
                    teacher=str(task_model), data=str(task_model.parent / "train.txt"), **STEPS)


def test_a_teacher_with_another_vocabulary_is_refused(task_model, tied, tmp_path):
    other = save_tiny_llama(tmp_path / "other", vocab=128)
    _one_line_error(r"vocabulary \(128 tokens.*\(20\)", "retrain.distill", str(tied), output=str(tmp_path / "o"),
                    teacher=str(other), data=str(task_model.parent / "train.txt"), **STEPS)


def test_a_materialised_checkpoint_from_disk_is_refused(task_model, tmp_path):
    run_op("tie", str(task_model), output=str(tmp_path / "mat"), loops=2, rank=2, materialize=True, device="cpu")
    _one_line_error("lost the shared/LoRA split", "retrain.distill", str(tmp_path / "mat"),
                    output=str(tmp_path / "o"), teacher=str(task_model), data=str(task_model.parent / "train.txt"),
                    **STEPS)


def test_no_teacher_is_an_error_naming_the_option(tied, task_model, tmp_path):
    _one_line_error("--teacher", "retrain.distill", str(tied), output=str(tmp_path / "o"),
                    data=str(task_model.parent / "train.txt"), **STEPS)


def test_a_recipe_names_student_and_teacher(task_model, tied, tmp_path):
    """`models: {student, teacher}`: the student is the first input, the teacher found by name (default)."""
    from surgeon.api import run_recipe

    recipe = {"version": 1, "models": {"student": str(tied), "teacher": str(task_model)},
              "steps": [{"retrain.distill": {"data": str(task_model.parent / "train.txt"), "seqlen": WINDOW,
                                             "steps": 2, "batch_size": 4}}],
              "output": str(tmp_path / "out")}
    res = run_recipe(recipe)
    info = res["steps"][0]["info"]["distill"]
    assert info["teacher"] == "teacher" and info["form"] == "compact"
    assert info["teacher_perplexity"] < info["perplexity_before"]


def test_cli_takes_teacher_and_exits_2_on_a_bad_student(task_model, tmp_path, capsys):
    from surgeon.cli import main

    code = main(["retrain", "distill", str(task_model), "--teacher", str(task_model), "--data",
                 str(task_model.parent / "train.txt"), "-o", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a tied model" in err and len(err.splitlines()) == 1


# --- the block-wise stage -------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@torch.no_grad()
def _layer_io(model, ids: torch.Tensor, layer: int, x: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of decoder layer ``layer`` of a transformers module on ``ids``; with ``x`` the layer gets
    ``x`` instead of its own input (the model's own forward builds the mask and rotary embeddings)."""
    blk = model.model.layers[layer]
    got: dict[str, torch.Tensor] = {}

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        got["x"] = h
        if x is None:
            return None
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def post(mod, args, kwargs, out):
        got["y"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    hooks = [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post, with_kwargs=True)]
    try:
        model.eval()(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return (got["x"] if x is None else x), got["y"]


def test_block_states_are_the_whole_modules_layer_inputs_and_last_output(tmp_path):
    """Every boundary of every micro-batch (3 windows per micro-batch, the last one short) equals the layer
    inputs (and the last layer's output) of the whole transformers module, read with hooks."""
    from surgeon.engine.outputs import block_states

    folder = save_tiny_llama(tmp_path / "m", layers=3, hidden=32, vocab=200)
    windows = torch.randint(0, 200, (7, 10), generator=torch.Generator().manual_seed(5))
    states = block_states(_engine(folder, 3), windows)
    hf = _hf(folder)
    assert states.n_layers == 3 and states.n_batches == 3
    for j, mb in enumerate(states.batches):
        ids = windows[mb.indices]
        for b in range(3):
            x, y = _layer_io(hf, ids, b)
            assert torch.allclose(states.get(b, j), x, rtol=0, atol=1e-5)
            if b == 2:
                assert torch.allclose(states.get(3, j), y, rtol=0, atol=1e-5)


def _slot_errors(student, teacher, probe: torch.Tensor, energy_windows: torch.Tensor, pairs: dict[int, list[int]]
                 ) -> dict[int, float]:
    """Literal port of the stage's objective per slot: mean over the slot's layers of
    mean((f_i(X_i) - Y_i)^2) on ``probe`` / mean((Y_i - X_i)^2) on ``energy_windows``."""
    out = {}
    for k, layers in pairs.items():
        errs = []
        for i in layers:
            xe, ye = _layer_io(teacher, energy_windows, i)
            x, y = _layer_io(teacher, probe, i)
            _, f = _layer_io(student, probe, i, x=x)
            errs.append(float(((f - y) ** 2).mean() / ((ye - xe) ** 2).mean()))
        out[k] = sum(errs) / len(errs)
    return out


def test_blockwise_stage_fits_every_shared_block_to_its_teacher_layers(task_model, tied, tmp_path):
    """After the stage (3 passes, one end-to-end step at a negligible rate), every slot's relative error on
    held-out windows, computed with hooks on the loaded checkpoints, is lower than the tie output's; the
    report's error before the stage equals the same computation on the training windows."""
    from surgeon.context import Context
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    out = tmp_path / "bw"
    run_op("retrain.distill", str(tied), output=str(out), teacher=str(task_model),
           data=str(task_model.parent / "train.txt"), seqlen=WINDOW, steps=1, lr=1e-12, batch_size=8,
           blockwise_epochs=3, blockwise_lr=5e-3, blockwise_windows=48, teacher_batch=4, device="cpu",
           quiet=True)
    report = json.loads((out / "recursion.json").read_text())["distill"]["blockwise"]
    pairs = {b["slot"]: b["layers"] for b in report["blocks"]}
    assert pairs == {0: [0, 1]}  # the task model: 2 layers tied into 1 slot x 2 loops
    teacher, before, after = _hf(task_model), surgeon.load_recursive(str(tied)), surgeon.load_recursive(str(out))
    held = _heldout(task_model)
    e_before, e_after = _slot_errors(before, teacher, held, held, pairs), _slot_errors(after, teacher, held, held,
                                                                                        pairs)
    print(f"\nheld-out relative error per slot: before {e_before}, after {e_after}")
    assert all(e_after[k] < 0.7 * e_before[k] for k in pairs)
    g = Graph.from_checkpoint(open_checkpoint(task_model))
    windows = Context().tokens(str(task_model.parent / "train.txt"), g, seqlen=WINDOW, max_windows=256 + 4)[:-4]
    train = windows[:48]
    ref = _slot_errors(before, teacher, train[:32], train, pairs)
    for b in report["blocks"]:
        assert b["fit_error_before"] == pytest.approx(ref[b["slot"]], rel=1e-4)
        assert b["fit_error_after"] < b["fit_error_before"]
    assert report["steps_per_block"] == 3 * 12 and report["windows"] == 48
