"""Edit metrics on the model engine (issue 18): efficacy, paraphrase and neighbourhood from ``Engine.logits_at``
equal a literal whole-model computation written here (transformers' own forward, one prompt at a time, greedy
decoding token by token), on the toy fact model of ``test_edit.py`` with an edited down-projection."""
from __future__ import annotations

import math

import pytest
import torch
from test_edit import OBJECTS, SUBJECTS, TEMPLATES, _graph, _tokenizer, _train_fact_model

from surgeon.context import Context


@pytest.fixture(scope="module")
def fact_model(tmp_path_factory):
    return _train_fact_model(tmp_path_factory.mktemp("facts") / "model")


def _lp(model, tok, prompt: str, answer: list[int]) -> float:
    head = tok(prompt)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([head + answer])).logits[0].log_softmax(-1)
    return sum(float(logp[len(head) - 1 + j, a]) for j, a in enumerate(answer)) / len(answer)


def _greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def _oracle(before_model, model, tok, requests) -> tuple[dict, list, list]:
    """CounterFact-style metrics (ALGORITHMS.md §4.7) literally: old answer = the unedited model's greedy
    continuation, efficacy = share preferring the new target (mean token log-prob), etc."""
    from surgeon.ops.edit.rows import target_ids

    target = [target_ids(tok, r.text, r.target) for r in requests]
    old = [_greedy(before_model, tok, r.text, len(t)) for r, t in zip(requests, target)]
    nb = [(p, i) for i, r in enumerate(requests) for p in r.neighborhood]
    nb_old = [_greedy(before_model, tok, p, len(target[i])) for p, i in nb]
    para = [(p, i) for i, r in enumerate(requests) for p in r.paraphrase_texts()]

    def share(flags):
        return round(sum(flags) / len(flags), 4) if flags else None

    lp_new = [_lp(model, tok, r.text, t) for r, t in zip(requests, target)]
    out = {
        "efficacy": share([a > _lp(model, tok, r.text, o) for a, r, t, o in zip(lp_new, requests, target, old)
                           if t != o]),
        "efficacy_greedy": share([_greedy(model, tok, r.text, len(t)) == t for r, t in zip(requests, target)]),
        "target_prob": round(sum(math.exp(x) for x in lp_new) / len(lp_new), 4),
        "paraphrase": share([_lp(model, tok, p, target[i]) > _lp(model, tok, p, old[i]) for p, i in para
                             if target[i] != old[i]]),
        "paraphrase_greedy": share([_greedy(model, tok, p, len(target[i])) == target[i] for p, i in para]),
        "neighborhood": share([_lp(model, tok, p, o) > _lp(model, tok, p, target[i]) for (p, i), o in zip(nb, nb_old)
                               if o != target[i]]),
        "neighborhood_unchanged": share([_greedy(model, tok, p, len(o)) == o for (p, i), o in zip(nb, nb_old)]),
    }
    return out, old, nb_old


def test_edit_metrics_on_the_engine_equal_the_whole_model(fact_model):
    from surgeon.ops.edit import metrics as mx
    from surgeon.ops.edit.requests import Request
    from transformers import AutoModelForCausalLM

    from surgeon.graph import Const

    tok = _tokenizer()
    requests = [Request(prompt=TEMPLATES[0] + " is", subject=SUBJECTS[i],
                        target=" " + OBJECTS[(i + 3) % 8] + " " + OBJECTS[i], paraphrases=[TEMPLATES[1] + " is"],
                        neighborhood=[TEMPLATES[0].format(SUBJECTS[i + 8]) + " is"]) for i in range(4)]
    before_model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    edited = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    g = torch.Generator().manual_seed(0)
    down = edited.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():  # a large random rank-2 change: some answers move, some stay
        down += 3.0 * torch.randn(64, 2, generator=g) @ torch.randn(2, 256, generator=g) / 16
    graph = _graph(fact_model)
    work = graph.copy()
    work.replace("model.layers.1.mlp.down_proj.weight", Const(down.detach().clone()))
    ctx = Context(quiet=True)

    before = mx.before_edit(mx.EngineScorer(graph, ctx), tok, requests)
    got = mx.after_edit(mx.EngineScorer(work, ctx), tok, requests, before)
    want, old, nb_old = _oracle(before_model, edited, tok, requests)
    assert before.old == old and before.neighbor_old == nb_old
    assert {k: v for k, v in got.items() if k != "target_prob"} == {k: v for k, v in want.items() if k != "target_prob"}
    assert abs(got["target_prob"] - want["target_prob"]) <= 1e-4
    assert 0 < want["target_prob"] < 1 and None not in want.values()
    # per-batch shares from one judged evaluation (AlphaEdit's batch history) equal a separate evaluation
    from surgeon.ops.edit.alphaedit import subset_before

    judged = mx.judge(mx.EngineScorer(work, ctx), tok, requests, before)
    for part in ([0, 1], [2, 3]):
        alone = mx.after_edit(mx.EngineScorer(work, ctx), tok, [requests[k] for k in part],
                              subset_before(before, part))
        assert mx.summarize(judged, part) == alone
    # teacher-forced log-probabilities themselves, rows of different lengths in one engine pass
    prompts = [r.text for r in requests] + [r.neighborhood[0] for r in requests]
    answers = before.target + before.neighbor_old
    lps = mx.answer_logprob(mx.EngineScorer(work, ctx), tok, prompts, answers)
    ref = [_lp(edited, tok, p, a) for p, a in zip(prompts, answers)]
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref), rtol=1e-5, atol=1e-5)


def test_engine_perplexity_equals_the_whole_model(fact_model):
    from surgeon.ops.edit.metrics import EngineScorer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    tok = _tokenizer()
    windows = torch.tensor([tok(TEMPLATES[0].format(s) + " " + o + " .")["input_ids"]
                            for s, o in zip(SUBJECTS[:6], OBJECTS[:6])])
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    got = EngineScorer(_graph(fact_model), Context(quiet=True)).perplexity(windows)
    assert abs(got - math.exp(float(nll))) <= 1e-4 * math.exp(float(nll))


def test_spread_on_gpt2_conv1d_writes_transposed_updates_and_reaches_what_transformers_computes(tmp_path):
    """GPT-2 stores c_proj as Conv1D [d_k, d_out]: the spread adds (up@down)ᵀ to each edited layer, and the top
    edited layer's output it reports after the batch is what transformers' GPT-2 computes with those weights."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.requests import Request
    from surgeon.ops.edit.site import locate
    from surgeon.ops.edit.solve import ridge_factors
    from surgeon.ops.edit.spread import spread
    from transformers import GPT2Config, GPT2LMHeadModel

    from surgeon.engine import SpillStore

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=1,
                     eos_token_id=2)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tok.save_pretrained(tmp_path / "gpt2")
    g, ctx = _graph(tmp_path / "gpt2"), Context(quiet=True)
    sites = [locate(g, x, ctx.roles(g)) for x in (0, 1)]
    assert all(s.transposed for s in sites)
    reqs = [Request(prompt=TEMPLATES[0] + " is", subject=SUBJECTS[i], target=" " + OBJECTS[i]) for i in range(2)]
    delta = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    res = spread(g, ctx, tok, sites, reqs, ["rain . "], delta,
                 lambda i, r, k: ridge_factors(r, k, CholeskyFactor.identity(128), 0.1), spill=SpillStore())
    for s, (up, down) in zip(sites, res.parts):
        new = res.weights[s.name].compute([])
        torch.testing.assert_close(new, g.value(s.name) + (up @ down).T.float(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            model.get_submodule(s.module_path).weight.copy_(new)
    seen = []
    h = model.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for r in reqs:
            ids = tok(r.text)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    h.remove()
    subject_at = [len(tok(TEMPLATES[0].format(r.subject))["input_ids"]) - 1 for r in reqs]  # its last token
    got = torch.stack([x[0, k] for x, k in zip(seen, subject_at)], 1)
    torch.testing.assert_close(res.reached, got, rtol=1e-4, atol=1e-5)
    assert float((res.reached - res.start - delta).norm()) < float(delta.norm())  # moved towards z
