"""ROME / EMMET knowledge editing: closed forms (numbers), requests validation, covariance cache, and behaviour on
a tiny Llama trained in the test to know synthetic facts ("the capital of Zorbia is Qel")."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgeon.context import Context
from surgeon.errors import SurgeonError

SUBJECTS = ["Zorbia", "Quenta", "Maldor", "Fenwick", "Tarsis", "Ulmora", "Brevik", "Korrin", "Xanthe", "Lumos",
            "Derrow", "Pellam", "Orvane", "Sirath", "Gethel", "Vantor", "Hollis", "Mirren", "Calder", "Ysolde",
            "Nerith", "Bastow", "Runnel", "Tovik"]
OBJECTS = ["Qel", "Abra", "Minto", "Sarp", "Vell", "Dura", "Kopp", "Lissa", "Nemo", "Orrin", "Pax", "Rilo",
           "Stav", "Tull", "Umba", "Voss", "Wren", "Yarl", "Zell", "Bram", "Cova", "Drim", "Essa", "Fane"]
FILLER = ["we", "saw", "many", "old", "people", "walk", "near", "river", "and", "then", "they", "sang", "songs",
          "about", "rain", "it", "was", "cold"]
TEMPLATES = ["the capital of {}", "we saw the capital city of {}"]
WORDS = ["the", "capital", "of", "is", "has", "its", "in", "a", "city", "."]


# ------------------------------------------------------------------------------------------ the fact model
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS, *FILLER, *SUBJECTS, *OBJECTS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _train_fact_model(folder: Path, steps: int = 80, layers: int = 2, direct: bool = False) -> Path:
    """A 2-layer Llama (hidden 64) trained until it recalls all 24 facts under both templates, also after a
    short prefix (so the model-sampled prefixes of ROME's keys are in distribution)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    rows, ys = [], []
    for t in TEMPLATES:
        for i, s in enumerate(SUBJECTS):
            for pre in ("", "it was cold . "):
                rows.append(tok(pre + t.format(s))["input_ids"])
                ys.append(tok.convert_tokens_to_ids(OBJECTS[i]))
    if direct:  # "Zorbia Qel": the object must be readable at the subject's own position
        for i, s in enumerate(SUBJECTS):
            rows.append(tok(s)["input_ids"])
            ys.append(tok.convert_tokens_to_ids(OBJECTS[i]))
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(rows):
        ids[k, :len(r)] = torch.tensor(r)
        mask[k, :len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rows])
    y = torch.tensor(ys)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(rows)), last]
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    assert bool((logits.argmax(-1) == y).all()), "the fact model did not learn its facts"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fact_model(tmp_path_factory) -> Path:
    return _train_fact_model(tmp_path_factory.mktemp("facts") / "model")


@pytest.fixture(autouse=True)
def _stats_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))


def _stats_text(path: Path) -> str:
    """A corpus for C: the facts under both templates and filler sentences (≥ 10·d_k tokens)."""
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(200):
        i = rng.randrange(len(SUBJECTS))
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randrange(2, 8)))
        lines.append(f"{filler} . {rng.choice(TEMPLATES).format(SUBJECTS[i])} {OBJECTS[i]} .")
    path.write_text("\n\n".join(lines))
    return str(path)


def _graph(folder: Path):
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    return Graph.from_checkpoint(open_checkpoint(folder))


def _answers(folder_or_model, prompts: list[str]) -> list[str]:
    """Greedy next word for each prompt, from a saved folder (reloaded with transformers) or a module."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    model = (AutoModelForCausalLM.from_pretrained(folder_or_model) if isinstance(folder_or_model, (str, Path))
             else folder_or_model)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            out.append(tok.convert_ids_to_tokens(int(model(input_ids=ids).logits[0, -1].argmax())))
    return out


def _request(i: int, new: int, **extra) -> dict:
    return {"prompt": TEMPLATES[0].format(SUBJECTS[i]), "subject": SUBJECTS[i], "target": " " + OBJECTS[new],
            **extra}


# --------------------------------------------------------------------------------------------- closed forms
def _random_problem(d_out=24, d_k=40, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_k, generator=g, dtype=torch.float64)
    x = torch.randn(400, d_k, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d_k, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    keys = torch.randn(d_k, n, generator=g, dtype=torch.float64)
    values = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return w, cov, keys, values


def test_rome_edit_holds_exactly():
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import rome_update

    w, cov, keys, values = _random_problem()
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    up, down = rome_update(w, keys[:, 0], values[:, 0], CholeskyFactor(cov), bias=bias)
    assert up.shape == (24, 1) and down.shape == (1, 40)
    w_new = w + up @ down
    torch.testing.assert_close(w_new @ keys[:, 0] + bias, values[:, 0], rtol=0, atol=1e-10)


def test_rome_leaves_keys_orthogonal_in_covariance_metric_unchanged():
    """ΔW k′ = 0 for every k′ with k′ᵀC⁻¹k = 0: the update only moves the C⁻¹k direction."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import rome_update

    w, cov, keys, values = _random_problem()
    k = keys[:, 0]
    u = torch.linalg.solve(cov, k)
    other = torch.randn(40, 6, dtype=torch.float64)
    other = other - u[:, None] * (u @ other) / (u @ u)  # uᵀ k′ = 0
    up, down = rome_update(w, k, values[:, 0], CholeskyFactor(cov))
    assert float((up @ down @ other).abs().max()) < 1e-10


def test_rome_is_the_minimal_change_in_the_covariance_metric():
    """Among updates with Ŵk = v*, r-ROME minimises tr(ΔW C ΔWᵀ): adding any ΔW′ with ΔW′k = 0 costs more."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import rome_update

    w, cov, keys, values = _random_problem()
    k = keys[:, 0]
    up, down = rome_update(w, k, values[:, 0], CholeskyFactor(cov))
    d = up @ down
    cost = torch.trace(d @ cov @ d.T)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        extra = torch.randn(24, 40, generator=g, dtype=torch.float64)
        extra = extra - (extra @ k)[:, None] * k[None, :] / (k @ k)  # extra k = 0 keeps the constraint
        d2 = d + 0.1 * extra
        assert torch.trace(d2 @ cov @ d2.T) > cost


def test_emmet_constraint_holds_with_zero_ridge():
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import emmet_update

    w, cov, keys, values = _random_problem(n=8)
    up, down = emmet_update(w, keys, values, CholeskyFactor(cov), lam=0.0)
    assert up.shape == (24, 8) and down.shape == (8, 40)
    torch.testing.assert_close((w + up @ down) @ keys, values, rtol=0, atol=1e-9)


def test_emmet_with_one_key_and_no_ridge_is_rome():
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import emmet_update, rome_update

    w, cov, keys, values = _random_problem(n=1)
    f = CholeskyFactor(cov)
    u1, d1 = rome_update(w, keys[:, 0], values[:, 0], f)
    u2, d2 = emmet_update(w, keys, values, f, lam=0.0)
    torch.testing.assert_close(u1 @ d1, u2 @ d2, rtol=1e-9, atol=1e-12)


def memit_update(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cov: torch.Tensor,
                 lam: float) -> torch.Tensor:
    """MEMIT's single-layer least squares (dense ΔW, fp64): argmin ‖ΔK − R‖² + λ′ tr(ΔCΔᵀ) = RKᵀ(λ′C + KKᵀ)⁻¹.

    The reference: it forms and solves the d_k×d_k system, which the factored forms avoid.
    """
    w, k, v, c = (x.to(torch.float64) for x in (weight, keys, values, cov))
    residual = v - w @ k
    a = lam * c + k @ k.T
    return torch.linalg.solve(a, k @ residual.T).T  # a is symmetric: (R Kᵀ a⁻¹)ᵀ = a⁻¹ K Rᵀ


@pytest.mark.parametrize("lam", [0.1, 15000.0, 1e6])
def test_emmet_equals_memit_least_squares(lam):
    """Push-through identity: R(KᵀC⁻¹K + λ′I)⁻¹KᵀC⁻¹ = RKᵀ(λ′C + KKᵀ)⁻¹ (MEMIT's single-layer solve)."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import emmet_update

    w, cov, keys, values = _random_problem(n=6)
    up, down = emmet_update(w, keys, values, CholeskyFactor(cov), lam=lam)
    ref = memit_update(w, keys, values, cov, lam)
    torch.testing.assert_close(up @ down, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))


def test_emmet_large_ridge_writes_only_part_of_the_residual():
    """One key with kᵀC⁻¹k = s: the update writes s/(s + λ′) of the residual (λ′ ≫ s: MEMIT-like spreading).
    EMMET adds λ′ to a single key only with ``ridge_single`` (the authors' code adds it for batches > 1)."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import emmet_update

    w, cov, keys, values = _random_problem(n=1)
    f = CholeskyFactor(cov)
    s = float(keys[:, 0] @ torch.linalg.solve(cov, keys[:, 0]))
    for lam in (0.0, s, 10 * s):
        up, down = emmet_update(w, keys, values, f, lam=lam, ridge_single=True)
        written = (up @ down @ keys)[:, 0]
        torch.testing.assert_close(written, (values - w @ keys)[:, 0] * s / (s + lam), rtol=1e-9, atol=1e-10)


def test_singular_covariance_gets_jitter():
    from surgeon.kernels.covariance import CholeskyFactor

    x = torch.randn(5, 20, dtype=torch.float64)
    f = CholeskyFactor(x.T @ x / 5)  # rank 5 of 20
    assert f.jitter > 0
    k = torch.randn(20, dtype=torch.float64)
    assert torch.isfinite(f.solve(k)).all()


def test_in_place_cholesky_retry_solves_the_jittered_system_and_keeps_the_input():
    """The factor is computed in place on one copy; after failed attempts it must still be chol(C + ε·mean(diag)·I)
    of the caller's (unchanged) C, and answer solves of that system."""
    from surgeon.kernels.covariance import CholeskyFactor

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 30, dtype=torch.float64, generator=g)
    cov = x.T @ x / 6  # rank 6 of 30
    cov[0, 1] += 1e-12  # not exactly symmetric: the factor is of (C + Cᵀ)/2
    before = cov.clone()
    f = CholeskyFactor(cov)
    assert f.jitter > 0 and torch.equal(cov, before)
    sym = (before + before.T) / 2
    target = sym + f.jitter * sym.diagonal().mean() * torch.eye(30, dtype=torch.float64)
    torch.testing.assert_close(f.lower @ f.lower.T, target, rtol=1e-10, atol=1e-12)
    k = torch.randn(30, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(f.solve(k), torch.linalg.solve(target, k), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(f.solve(k[:, 0]), torch.linalg.solve(target, k[:, 0]), rtol=1e-6, atol=1e-9)


def test_conv1d_and_linear_orientation_agree():
    """The same edit written into a Linear weight and into its Conv1D (transposed) storage gives Wᵀ-equal nodes."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import rome_update

    from surgeon.graph import Const, LowRank

    w, cov, keys, values = _random_problem()
    up, down = rome_update(w, keys[:, 0], values[:, 0], CholeskyFactor(cov))
    lin = LowRank(Const(w.float()), up, down).compute([w.float()])
    conv = LowRank(Const(w.T.contiguous().float()), up, down, transposed=True).compute([w.T.contiguous().float()])
    torch.testing.assert_close(conv, lin.T)


def test_default_layer_rule():
    from surgeon.ops.edit.site import default_layer

    assert default_layer("llama", 32)[0] == 5
    assert default_layer("gpt2", 48)[0] == 17 and default_layer("gpt2", 24)[0] == 8
    assert default_layer("gptj", 28)[0] == 5
    assert default_layer("llama", 30)[0] == 5  # SmolLM2-135M: round(30·5/32)
    assert default_layer("qwen2", 64)[0] == 10  # unknown family: Llama ratio
    assert default_layer("llama", 2)[0] == 0


# ------------------------------------------------------------------------------------------------- requests
def test_requests_load_jsonl_yaml_and_placeholder(tmp_path):
    from surgeon.ops.edit.requests import load_requests

    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"prompt": "{} is in the city of", "subject": "Eiffel Tower", "target_new": " Rome"})
                 + "\n\n" + json.dumps({"prompt": "The Louvre is in", "subject": "Louvre", "target": " Oslo",
                                        "paraphrases": ["Where is {}? In"]}) + "\n")
    reqs = load_requests(p, Context())
    assert [r.text for r in reqs] == ["Eiffel Tower is in the city of", "The Louvre is in"]
    assert reqs[0].target == " Rome" and reqs[1].paraphrase_texts() == ["Where is Louvre? In"]
    y = tmp_path / "r.yaml"
    y.write_text("- prompt: The Louvre is in\n  subject: Louvre\n  target: ' Oslo'\n")
    assert load_requests(y, Context())[0].template == "The {} is in"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "The Louvre is in", "subject": "Eiffel", "target": " Rome"}', "does not occur in prompt"),
    ('{"prompt": "The Louvre is in", "subject": "Louvre", "target": "  "}', "target is empty"),
    ('{"prompt": "The Louvre is in", "subject": "Louvre"}', "target"),
    ('{"prompt": "The Louvre is in", "subject": "Louvre", "target": " x", "colour": 1}', "colour"),
    ('{"prompt": "The Louvre is in", ', "invalid JSON"),
])
def test_bad_requests_name_file_and_line(tmp_path, line, message):
    from surgeon.ops.edit.requests import load_requests

    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "{} is in", "subject": "Louvre", "target": " Paris"}\n' + line + "\n")
    with pytest.raises(SurgeonError, match=message) as e:
        load_requests(p, Context())
    assert f"{p}:2" in str(e.value)


def test_missing_requests_file_is_clear(tmp_path):
    from surgeon.ops.edit.requests import load_requests

    with pytest.raises(SurgeonError, match="--requests: .*nope.jsonl does not exist"):
        load_requests(tmp_path / "nope.jsonl", Context())


def test_duplicate_subjects_go_to_later_batches():
    from surgeon.ops.edit.requests import Request, duplicate_subjects, subject_batches

    reqs = [Request(prompt="{} is in", subject=s, target=" x") for s in ["a", "b", "a", "c", "d", "e"]]
    assert duplicate_subjects(reqs) == {"a": 2}
    batches = subject_batches(reqs, max_batch=3)
    assert [[r.subject for r in b] for b in batches] == [["a", "b"], ["a", "c", "d"], ["e"]]


def test_params_forbid_unknown_and_validate():
    from pydantic import ValidationError
    from surgeon.ops.edit.emmet import Params as EmmetParams
    from surgeon.ops.edit.rome import Params as RomeParams

    with pytest.raises(ValidationError):
        RomeParams(requests="r.jsonl", lam=1.0)
    with pytest.raises(ValidationError):
        EmmetParams(requests="r.jsonl", batch_size=2048)
    with pytest.raises(ValidationError):
        RomeParams(requests=[{"prompt": "The Louvre is in", "subject": "Eiffel", "target": " x"}])
    p = EmmetParams(requests=[{"prompt": "{} is in", "subject": "Louvre", "target": " x"}])
    assert p.requests[0].text == "Louvre is in"


# --------------------------------------------------------------------------------------------- behaviour
def _zero_solve(i, residual, keys):
    return torch.zeros(residual.shape[0], keys.shape[1]), torch.zeros(keys.shape[1], keys.shape[0])


def test_fact_model_keys_match_a_manual_hook(fact_model):
    """The key the engine's spread takes is the down-projection input at the subject's last token (BOS counted;
    rows of different lengths in one pass). Oracle: a hook on the transformers module, one prompt at a time."""
    from surgeon.ops.edit.requests import Request
    from surgeon.ops.edit.site import locate
    from surgeon.ops.edit.spread import spread
    from transformers import AutoModelForCausalLM

    from surgeon.context import Context
    from surgeon.engine import SpillStore

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    tok = _tokenizer()
    down = model.model.layers[0].mlp.down_proj
    reqs = [Request(prompt="{} has its capital in", subject="Zorbia", target=" Abra"),
            Request(prompt="the capital of {} is", subject="Quenta", target=" Qel")]
    g, ctx = _graph(fact_model), Context(quiet=True)
    res = spread(g, ctx, tok, [locate(g, 0, ctx.roles(g))], reqs, [], torch.zeros(64, 2), _zero_solve,
                 spill=SpillStore())
    keys = res.keys[0]
    seen = []
    h = down.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([tok("Zorbia has its capital in")["input_ids"]]))
        model(input_ids=torch.tensor([tok("the capital of Quenta is")["input_ids"]]))
    h.remove()
    torch.testing.assert_close(keys[:, 0], seen[0][0, 1])  # <s> Zorbia ...: subject at index 1
    torch.testing.assert_close(keys[:, 1], seen[1][0, 4])  # <s> the capital of Quenta
    assert torch.equal(res.reached, res.start)  # a zero update leaves the top layer's output alone


def test_values_per_request_equal_the_joint_batch_and_stop_early(fact_model):
    """Requests are optimised independently on the engine: all together or one at a time gives the same values,
    and a request stops at its own convergence."""
    from surgeon.ops.edit.engine_values import optimise_values_engine
    from surgeon.ops.edit.keys_values import ValueSettings
    from surgeon.ops.edit.requests import Request
    from surgeon.ops.edit.site import locate

    from surgeon.context import Context

    tok = _tokenizer()
    g, ctx = _graph(fact_model), Context(quiet=True)
    site = locate(g, 0, ctx.roles(g))
    reqs = [Request(**_request(i, (i + 5) % len(OBJECTS))) for i in range(3)]
    settings = ValueSettings(steps=12, lr=0.5, stop_loss=0.5)
    joint = optimise_values_engine(g, ctx, site, tok, reqs, [], settings)
    alone = [optimise_values_engine(g, ctx, site, tok, [r], [], settings) for r in reqs]
    torch.testing.assert_close(torch.cat([a.values for a in alone], 1), joint.values, rtol=1e-4, atol=1e-5)
    assert [a.steps[0] for a in alone] == joint.steps and min(joint.steps) < settings.steps - 1


def test_rome_edits_one_fact_and_keeps_the_others(fact_model, tmp_path):
    from surgeon.api import run_op

    stats = _stats_text(tmp_path / "stats.txt")
    out = tmp_path / "edited"
    req = _request(0, 5, paraphrases=[TEMPLATES[1]],
                   neighborhood=[TEMPLATES[0].format(s) for s in SUBJECTS[1:6]])
    res = run_op("edit.rome", str(fact_model), output=str(out), device="cpu", requests=[req], stats_data=stats,
                 n_prefixes=4)
    info = res["steps"][0]["info"]
    assert info["edits"][0]["constraint_rel_error"] < 1e-5  # Ŵk = v* in the written fp32 weights
    metrics = res["results"][-1]
    assert metrics["efficacy"] == 1.0 and metrics["efficacy_greedy"] == 1.0
    assert metrics["neighborhood"] == 1.0
    # reloaded from disk with plain transformers: the edit stuck, every other fact is unchanged
    got = _answers(out, [TEMPLATES[0].format(s) for s in SUBJECTS])
    assert got[0] == OBJECTS[5]
    assert got[1:] == OBJECTS[1:]
    # only the edited tensor differs; the undo file restores it bit for bit
    from safetensors.torch import load_file

    before, after = load_file(fact_model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    undo = load_file(out / "edits.safetensors")
    assert torch.equal(undo[changed[0] + ".original"], before[changed[0]])
    delta = undo[changed[0] + ".up"] @ undo[changed[0] + ".down"]
    torch.testing.assert_close(before[changed[0]] + delta, after[changed[0]])


def test_emmet_edits_sixteen_facts_at_once(fact_model, tmp_path):
    from surgeon.api import run_op

    stats = _stats_text(tmp_path / "stats.txt")
    out = tmp_path / "edited"
    # subject i -> object of subject (i + 1) for the first 16; subjects 16..23 stay
    reqs = [_request(i, (i + 1) % 16) for i in range(16)]
    res = run_op("edit.emmet", str(fact_model), output=str(out), device="cpu", requests=reqs, stats_data=stats,
                 n_prefixes=2)
    info = res["steps"][0]["info"]
    assert info["batches"] == 1 and max(e["constraint_rel_error"] for e in info["edits"]) < 1e-2
    got = _answers(out, [TEMPLATES[0].format(s) for s in SUBJECTS])
    assert got[:16] == [OBJECTS[(i + 1) % 16] for i in range(16)]
    # the toy model's 24 subject keys overlap (C-metric cosine up to ≈ 0.25), and 16 large edits leak into
    # at most one of the 8 untouched facts; ROME's single edit above keeps all 23
    assert sum(a == b for a, b in zip(got[16:], OBJECTS[16:])) >= 7


def test_stats_are_cached_and_keyed_by_weights(fact_model, tmp_path):
    from surgeon.ops.edit.editing import covariance
    from surgeon.ops.edit.rome import Params
    from surgeon.ops.edit.site import locate

    from surgeon.context import Context

    stats = _stats_text(tmp_path / "stats.txt")
    g = _graph(fact_model)
    ctx = Context(quiet=True)
    site = locate(g, None, ctx.roles(g))
    params = Params(requests=[_request(0, 1)], stats_data=stats)
    model = ctx.module(g)
    module = model.get_submodule(site.module_path)
    f1, info1 = covariance(g, ctx, site, params)
    f2, info2 = covariance(g, ctx, site, params)
    assert info1["stats"] == "computed" and info2["stats"] == "cache"
    assert info1["stats_tokens"] >= 10 * site.d_k
    torch.testing.assert_close(f1.lower, f2.lower)
    # C really is E[kkᵀ] over the corpus' tokens (windows capped at the model's 64-token context)
    from safetensors.torch import load_file

    from surgeon.data import effective_seqlen

    mom2 = load_file(info1["stats_file"])["mom2"].double()
    seqlen = effective_seqlen(256, g.config)
    windows = ctx.tokens(stats, g, seqlen=seqlen, max_windows=-(-10 * site.d_k // seqlen))
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, site.d_k)))
    with torch.no_grad():
        model(input_ids=windows)
    h.remove()
    x = torch.cat(seen).double()[: info1["stats_tokens"]]
    torch.testing.assert_close(mom2, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)
    # another model (different MLP weights at that layer) does not hit the cache
    from surgeon.graph import Const

    g2 = g.copy()
    g2.replace(site.name, Const(g.value(site.name) * 1.5))
    _f3, info3 = covariance(g2, ctx, site, params)
    assert info3["stats"] == "computed"
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 2


def test_edit_is_deterministic_for_a_fixed_seed(fact_model, tmp_path):
    from surgeon.ops.edit.rome import Params, apply

    from surgeon.context import Context

    params = Params(requests=[_request(2, 7)], stats_data="identity", n_prefixes=2, metrics=False, steps=5)
    a = apply(_graph(fact_model), params, Context(quiet=True, seed=3))
    b = apply(_graph(fact_model), params, Context(quiet=True, seed=3))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a.value(name), b.value(name))
    assert a.nodes[name].rank == 1


def test_unknown_layer_is_refused(fact_model):
    from surgeon.ops.edit.rome import Params, apply

    from surgeon.context import Context

    with pytest.raises(SurgeonError, match="layers 0..1"):
        apply(_graph(fact_model), Params(requests=[_request(0, 1)], layer=7), Context(quiet=True))


def test_rome_on_gpt2_conv1d_writes_the_transposed_update(tmp_path):
    """GPT-2 stores c_proj as Conv1D [d_k, d_out]: the edit is computed in Linear orientation and written back
    transposed; the edited module's output at the key is v* and the target becomes the greedy answer."""
    from surgeon.ops.edit.rome import Params, apply
    from transformers import GPT2Config, GPT2LMHeadModel

    from surgeon.context import Context

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                     eos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # init std 0.02 on a tied head caps every probability near 1/vocab; widen it
        model.transformer.wte.weight.mul_(50)
    model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tok.save_pretrained(tmp_path / "gpt2")
    g = _graph(tmp_path / "gpt2")
    ctx = Context(quiet=True)
    # random init: c_proj outputs are tiny, so GPT-2's reference wd 0.5·‖δ‖/‖v₀‖² and clamp 4·‖v₀‖ would pin δ
    params = Params(requests=[_request(0, 5)], stats_data="identity", n_prefixes=2, layer=1, weight_decay=0.0,
                    clamp=1000.0)
    out = apply(g, params, ctx)
    name = ctx.step_info["tensor"]
    assert name.endswith("h.1.mlp.c_proj.weight") and g[name].shape == (128, 32)
    node = out.nodes[name]
    assert node.transposed and node.up.shape == (32, 1) and node.down.shape == (1, 128)
    torch.testing.assert_close(out.value(name), g.value(name) + (node.up @ node.down).T)
    assert ctx.step_info["edits"][0]["constraint_rel_error"] < 1e-5
    ids = torch.tensor([tok(TEMPLATES[0].format(SUBJECTS[0]))["input_ids"]])
    target = tok.convert_tokens_to_ids(OBJECTS[5])
    with torch.no_grad():
        p0 = ctx.module(g)(input_ids=ids).logits[0, -1].softmax(-1)[target]
        p1 = ctx.module(out)(input_ids=ids).logits[0, -1].softmax(-1)[target]
    assert float(p1) > 0.5 > float(p0)


# ------------------------------------------------------------------- fidelity to the authors' reference code
# Each oracle below is the reference's computation written out in the test (kmeng01/rome, kmeng01/memit,
# scalable-model-editing/unified-model-editing), not a call into the code under test.
def _ref_inverse_update(cov, keys, resid, lam, *, ridge_for_one: bool):
    """emmet_main.py: C⁻¹ by inverse, D = KᵀC⁻¹K (+ λI only if D is larger than 1×1), ΔW = R (D⁻¹KᵀC⁻¹)."""
    c_inv = torch.inverse(cov)
    d = keys.T @ c_inv @ keys
    if d.shape[0] > 1 or ridge_for_one:
        d = d + lam * torch.eye(d.shape[0], dtype=d.dtype)
    adj_k = (torch.inverse(d) @ keys.T @ c_inv).T
    return resid @ adj_k.T


@pytest.mark.parametrize("n", [1, 3])
def test_emmet_ridge_only_for_batches_of_more_than_one(n):
    """Item 4: the reference adds λ only when D = KᵀC⁻¹K is larger than 1×1; ``ridge_single`` adds it always."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import emmet_update

    w, cov, keys, values = _random_problem(n=n)
    f = CholeskyFactor(cov)
    lam = 50.0
    up, down = emmet_update(w, keys, values, f, lam=lam)
    ref = _ref_inverse_update(cov, keys, values - w @ keys, lam, ridge_for_one=False)
    torch.testing.assert_close(up @ down, ref, rtol=1e-7, atol=1e-10)
    up, down = emmet_update(w, keys, values, f, lam=lam, ridge_single=True)
    ref = _ref_inverse_update(cov, keys, values - w @ keys, lam, ridge_for_one=True)
    torch.testing.assert_close(up @ down, ref, rtol=1e-7, atol=1e-10)


def test_emmet_delta_residual_is_the_reference_codes():
    """Item 5: ``residual='delta'`` is the code's targets = zs − cur_zs = δ (v* − v₀ of the plain prompt), the
    default the paper's v* − W k̄ − b; they differ by v₀ − W k̄ − b (averaged key vs the plain prompt's output)."""
    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.solve import emmet_update

    w, cov, keys, values = _random_problem(n=4)
    f = CholeskyFactor(cov)
    v0 = values - 0.3 * torch.randn(values.shape, generator=torch.Generator().manual_seed(5), dtype=values.dtype)
    up, down = emmet_update(w, keys, values, f, lam=0.1, initial=v0)
    ref = _ref_inverse_update(cov, keys, values - v0, 0.1, ridge_for_one=False)
    torch.testing.assert_close(up @ down, ref, rtol=1e-7, atol=1e-10)
    paper_up, paper_down = emmet_update(w, keys, values, f, lam=0.1)
    assert not torch.allclose(paper_up @ paper_down, ref)


def test_reference_hparams_per_family():
    """Item 6: the values shipped in the reference hparams files, written out here."""
    from surgeon.ops.edit.editing import reference_defaults, settings_for
    from surgeon.ops.edit.rome import Params

    # kmeng01/rome hparams/ROME: gpt2-medium (clamp 3), gpt2-large/xl, EleutherAI_gpt-j-6B, gpt-neox-20b
    assert reference_defaults("rome", "gpt2", 24) == (20, 0.5, 3.0, 0.0)
    assert reference_defaults("rome", "gpt2", 36) == (20, 0.5, 4.0, 0.0)
    assert reference_defaults("rome", "gpt2", 48) == (20, 0.5, 4.0, 0.0)
    assert reference_defaults("rome", "gptj", 28) == (20, 0.5, 4.0, 0.0)
    assert reference_defaults("rome", "gpt_neox", 44) == (20, 0.5, 4.0, 0.0)
    # unified-model-editing hparams/EMMET (λ′ = mom2_update_weight · emmet_lambda): 1000·0.1, 1·0.1, 1·0.1
    assert reference_defaults("emmet", "gpt2", 48) == (20, 0.5, 0.75, 100.0)
    assert reference_defaults("emmet", "gptj", 28) == (25, 0.5, 0.75, 0.1)
    assert reference_defaults("emmet", "llama", 32) == (25, 1e-3, 4.0, 0.1)
    # kmeng01/memit hparams/MEMIT gpt2-xl, gpt-j; EasyEdit hparams/MEMIT/llama-7b.yaml
    assert reference_defaults("memit", "gpt2", 48) == (20, 0.5, 0.75, 20000.0)
    assert reference_defaults("memit", "gptj", 28) == (25, 0.5, 0.75, 15000.0)
    assert reference_defaults("memit", "llama", 32) == (25, 1e-3, 4.0, 15000.0)
    s, _ = settings_for("rome", "gpt2", Params(requests="x.jsonl"), 24)
    assert (s.steps, s.weight_decay, s.clamp, s.norm_reference, s.uniform_keys) == (20, 0.5, 3.0, "mlp", True)
    s, _ = settings_for("rome", "gpt2", Params(requests="x.jsonl", clamp=2.0, key_average="types"), 24)
    assert (s.clamp, s.uniform_keys) == (2.0, False)


def test_memit_default_layers_scale_the_reference_ranges():
    from surgeon.ops.edit.memit import default_layers

    assert default_layers("gpt2", 48)[0] == [13, 14, 15, 16, 17]  # kmeng01/memit gpt2-xl
    assert default_layers("gptj", 28)[0] == [3, 4, 5, 6, 7, 8]  # kmeng01/memit gpt-j
    assert default_layers("llama", 32)[0] == [4, 5, 6, 7, 8]  # EasyEdit llama-7b
    assert default_layers("llama", 30)[0] == [4, 5, 6, 7, 8]  # SmolLM2-135M
    layers, rule = default_layers("qwen2", 2)
    assert layers == [0] and "no published" in rule


def test_bare_targets_get_the_reference_leading_space():
    """Item 3: rome_main.py / execute_memit / execute_emmet prepend " " when target_new["str"][0] != " "."""
    from surgeon.ops.edit.requests import Request, with_leading_space

    def ref(target: str) -> str:  # the reference's rule, written out
        return target if target[0] == " " else " " + target

    reqs = [Request.model_validate({"prompt": "{} is located in", "subject": "Louvre",
                                    "target_new": {"str": "Sweden"}, "target_true": {"str": "France"}}),
            Request(prompt="Louvre is in", subject="Louvre", target=" Rome"),
            Request(prompt="Louvre is in ", subject="Louvre", target="Rome")]  # prompt ends in a space: kept
    got = with_leading_space(reqs)
    assert [g.target for g in got[:2]] == [ref("Sweden"), ref(" Rome")]
    assert got[0].target_true == " France" and got[2].target == "Rome"
    assert reqs[0].target == "Sweden"  # inputs are not modified


def test_rome_prefixes_start_at_bos_and_count_the_seed(fact_model):
    """Item 2: ROME's templates are sampled from "<|endoftext|>" (BOS) with max_out_len 5 and 10 counting the
    seed token (4 and 9 new tokens); MEMIT/EMMET's from the seed words. On the engine the drawn tokens are those
    of a literal top-5 sampling loop on the transformers model (same generator, whole rows, no cache)."""
    from surgeon.ops.edit.metrics import EngineScorer
    from surgeon.ops.edit.prefixes import prefix_lengths, sample_prefixes, seed_ids
    from transformers import AutoModelForCausalLM

    from surgeon.context import Context

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    tok = _tokenizer()
    assert seed_ids(tok, "bos", 3) == [[tok.bos_token_id]] * 3
    assert seed_ids(tok, "words", 2) == [tok("The")["input_ids"], tok("Therefore")["input_ids"]]
    assert prefix_lengths("rome", 20) == [5] * 10 + [10] * 10
    scorer = EngineScorer(_graph(fact_model), Context(quiet=True))
    seen = []

    def recording(rows, positions):
        seen.append([list(r) for r in rows])
        return scorer(rows, positions)

    texts = sample_prefixes(recording, tok, [5, 10], seed=0, seeds="bos")
    assert seen[0] == [[tok.bos_token_id]] * 2  # the first pass sees only BOS
    assert len(seen) == 9  # 10 tokens in all, the BOS included
    assert all(t.endswith(". ") for t in texts)
    gen, rows = torch.Generator().manual_seed(0), [[tok.bos_token_id], [tok.bos_token_id]]
    for _ in range(9):
        with torch.no_grad():
            logits = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])
        top = logits.topk(5, dim=-1)
        pick = top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=gen))[:, 0]
        rows = [r + [int(t)] for r, t in zip(rows, pick)]
    assert seen[-1] == [r[:-1] for r in rows]
    assert texts[0] == tok.decode(rows[0][:5], skip_special_tokens=True).strip() + ". "


@pytest.mark.parametrize("seeds, lengths", [("bos", [5, 10, 10]), ("words", [10, 10, 10, 10, 10])])
def test_prefixes_through_the_engines_kv_cache_equal_the_literal_sampling_loop(fact_model, seeds, lengths):
    """EngineScorer.decode (the engine's cached Decoder) draws the same tokens as a literal top-5 loop on the
    transformers model over whole rows, with the same generator; the decoder is really used (one call)."""
    from surgeon.ops.edit.metrics import EngineScorer
    from surgeon.ops.edit.prefixes import sample_prefixes, seed_ids
    from transformers import AutoModelForCausalLM

    from surgeon.context import Context

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    tok = _tokenizer()
    starts = seed_ids(tok, seeds, len(lengths))
    if len({len(s) for s in starts}) != 1:
        pytest.skip("seed words of unequal token length take the uncached path")
    scorer = EngineScorer(_graph(fact_model), Context(quiet=True))
    calls = []

    class Counting:
        def __call__(self, rows, positions):
            raise AssertionError("the cached decoder should have been used")

        def decode(self, *a):
            calls.append(a[1])
            return scorer.decode(*a)

    texts = sample_prefixes(Counting(), tok, lengths, seed=3, seeds=seeds)
    steps = max(n - len(s) for s, n in zip(starts, lengths))
    assert calls == [steps]
    gen, rows = torch.Generator().manual_seed(3), [list(s) for s in starts]
    for _ in range(steps):
        with torch.no_grad():
            logits = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])
        top = logits.topk(5, dim=-1)
        pick = top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=gen))[:, 0]
        rows = [r + [int(t)] for r, t in zip(rows, pick)]
    for text, row, st, n in zip(texts, rows, starts, lengths):
        want = tok.decode(row[:n], skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
        assert text == want + ". "


def test_rome_key_is_the_uniform_mean_over_all_templates(fact_model):
    """Item 2: compute_u averages the plain prompt and every prefixed one with equal weight (1/(1+P)) (the keys
    of the value loop's first pass); MEMIT's compute_ks averages per template type: ½(plain + mean prefixed) (the
    spread's keys). Oracle: a forward hook per prompt."""
    from surgeon.ops.edit.engine_values import optimise_values_engine
    from surgeon.ops.edit.keys_values import ValueSettings
    from surgeon.ops.edit.requests import Request
    from surgeon.ops.edit.site import locate
    from surgeon.ops.edit.spread import spread
    from transformers import AutoModelForCausalLM

    from surgeon.context import Context
    from surgeon.engine import SpillStore

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    tok = _tokenizer()
    down = model.model.layers[0].mlp.down_proj
    req = Request(prompt="the capital of {} is", subject="Quenta", target=" Qel")
    prefixes = ["it was cold . ", "we saw many old people . ", "rain . "]
    seen = []
    h = down.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for p in ("", *prefixes):
            text = p + "the capital of Quenta"
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    h.remove()
    at_subject = torch.stack([x[-1] for x in seen])  # the prompt is cut after the subject: its last token
    uniform = at_subject.mean(0)
    types = 0.5 * (at_subject[0] + at_subject[1:].mean(0))
    g, ctx = _graph(fact_model), Context(quiet=True)
    site = locate(g, 0, ctx.roles(g))
    res = spread(g, ctx, tok, [site], [req], prefixes, torch.zeros(64, 1), _zero_solve, spill=SpillStore())
    torch.testing.assert_close(res.keys[0][:, 0], types, rtol=1e-5, atol=1e-6)
    res = spread(g, ctx, tok, [site], [req], prefixes, torch.zeros(64, 1), _zero_solve, spill=SpillStore(),
                 uniform_keys=True)
    torch.testing.assert_close(res.keys[0][:, 0], uniform, rtol=1e-5, atol=1e-6)
    got = optimise_values_engine(g, ctx, site, tok, [req], prefixes, ValueSettings(steps=1, uniform_keys=True)).keys
    torch.testing.assert_close(got[:, 0], uniform, rtol=1e-5, atol=1e-5)


def _reference_compute_z(model, tok, req, prefixes, layer_idx, *, steps, clamp, wd, kl_factor=0.0625,
                         at_layer_output=True):
    """A literal port of compute_z (unified-model-editing emmet/compute_z.py; memit/compute_z.py) and, with
    ``at_layer_output=False``, of ROME's compute_v value loop: δ added at the subject's last token of every
    prompt (whole right-padded rows), target_init = that output on the plain prompt, loss = mean NLL + KL on
    "{} is a" + wd·‖δ‖/‖target_init‖², Adam lr 0.5, projection onto ‖δ‖ ≤ clamp·‖target_init‖."""
    target = tok(req.target, add_special_tokens=False)["input_ids"]
    templates = ["{}", *[p + "{}" for p in prefixes]]
    rewriting = [t.format(req.text) + (tok.decode(target[:-1]) if len(target) > 1 else "") for t in templates]
    texts = rewriting + [f"{req.subject} is a"]
    rows = [tok(t)["input_ids"] for t in texts]
    subj_tok = tok.convert_tokens_to_ids(req.subject)
    lookup = [max(i for i, x in enumerate(r) if x == subj_tok) for r in rows]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    site = model.model.layers[layer_idx] if at_layer_output else model.model.layers[layer_idx].mlp
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    state = {}

    def edit_output(_m, _a, out):
        h = out if isinstance(out, torch.Tensor) else out[0]
        if "init" not in state:
            state["init"] = h[0, lookup[0]].detach().clone()
        h = h.clone()
        for i, idx in enumerate(lookup):
            h[i, idx] = h[i, idx] + delta
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    handle = site.register_forward_hook(edit_output)
    opt = torch.optim.Adam([delta], lr=0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init = None
    try:
        for it in range(steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            kl_lp = torch.log_softmax(logits[len(rows) - 1, lookup[-1]][None], -1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            lp = torch.log_softmax(logits[: len(rewriting)], -1)
            nll_each = []
            for i, r in enumerate(rows[: len(rewriting)]):
                n = len(r)
                pos = range(n - len(target), n)  # rewriting_targets: gathered at the same positions
                nll_each.append(-sum(lp[i, p, t] for p, t in zip(pos, target)) / len(target))
            nll = torch.stack(nll_each).mean()
            kl = kl_factor * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            loss = nll + kl + wd * (delta.norm() / state["init"].norm() ** 2)
            if loss < 5e-2 or it == steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = clamp * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    return delta.detach(), state["init"]


@pytest.mark.parametrize("norm_reference", ["layer", "mlp"])
def test_value_optimisation_matches_the_reference_loop(fact_model, norm_reference):
    """Item 1: with norm_reference 'layer' (EMMET/MEMIT) the clamp ball and the weight decay are measured against
    the layer output h_L, with 'mlp' (ROME) against the MLP output; the whole δ matches the reference loop."""
    from surgeon.ops.edit.engine_values import optimise_values_engine
    from surgeon.ops.edit.keys_values import ValueSettings
    from surgeon.ops.edit.requests import Request
    from surgeon.ops.edit.site import locate
    from transformers import AutoModelForCausalLM

    from surgeon.context import Context

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    tok = _tokenizer()
    req = Request(**_request(1, 7))
    prefixes = ["it was cold . ", "rain . "]
    # a tight ball (0.3) so that the projection is active, the reference's GPT-2/J weight decay 0.5
    settings = ValueSettings(steps=8, lr=0.5, weight_decay=0.5, clamp=0.3, norm_reference=norm_reference)
    ref_delta, init = _reference_compute_z(model, tok, req, prefixes, 1, steps=8, clamp=0.3, wd=0.5,
                                           at_layer_output=norm_reference == "layer")
    # on the model engine (block by block, blocks 1.. resident)
    g = _graph(fact_model)
    ctx = Context(quiet=True)
    eng = optimise_values_engine(g, ctx, locate(g, 1, ctx.roles(g)), tok, [req], prefixes, settings)
    delta = (eng.values - eng.initial)[:, 0]
    torch.testing.assert_close(delta, ref_delta, rtol=2e-4, atol=2e-5)
    assert abs(float(delta.norm()) - 0.3 * float(init.norm())) < 1e-3 * float(init.norm())  # on the ball


def _reference_memit_loop(model, tok, reqs, prefixes, layers, zs, covs, lam, alpha=None):
    """A literal port of execute_memit's insertion loop (kmeng01/memit memit_main.py) on the toy Llama: keys by
    compute_ks (mean per template type, then over types), cur_zs = the top layer's output on the plain prompts
    (a forward hook on the decoder layer, as nethook.TraceDict), resid = (zs − cur_zs)/(layers left), adj_k = solve(λC + KKᵀ, K),
    W += resid adj_kᵀ, in layer order. With ``alpha = (P, cache_c, L2)`` per layer the update is AlphaEdit's
    (jianghoucheng/AlphaEdit AlphaEdit_main.py): upd = solve(P(KKᵀ + cache_c) + L2·I, P K residᵀ), W += updᵀ."""
    def lookup(ids, subject):
        s = tok.convert_tokens_to_ids(subject)
        return max(i for i, x in enumerate(ids) if x == s)

    for i, layer in enumerate(layers):
        down = model.model.layers[layer].mlp.down_proj
        cols = []
        for r in reqs:
            got = []
            for t in ["{}", *[p + "{}" for p in prefixes]]:
                ids = tok(t.format(r.text))["input_ids"]
                seen = []
                h = down.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0][0].detach()))
                with torch.no_grad():
                    model(input_ids=torch.tensor([ids]))
                h.remove()
                got.append(seen[0][lookup(ids, r.subject)])
            types = [got[0], torch.stack(got[1:]).mean(0)] if prefixes else [got[0]]
            cols.append(torch.stack(types).mean(0))
        ks = torch.stack(cols, 1).double()
        cur = []
        for r in reqs:
            ids = tok(r.text)["input_ids"]
            out = []
            h = model.model.layers[layers[-1]].register_forward_hook(
                lambda m, a, o, out=out: out.append(o if isinstance(o, torch.Tensor) else o[0]))
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            h.remove()
            cur.append(out[0][0, lookup(ids, r.subject)])
        targets = zs.double() - torch.stack(cur, 1).double()
        resid = targets / (len(layers) - i)
        if alpha is None:
            adj_k = torch.linalg.solve(lam * covs[i] + ks @ ks.T, ks)
            upd = resid @ adj_k.T
        else:
            p, cache_c, l2 = alpha[i]
            upd = torch.linalg.solve(p @ (ks @ ks.T + cache_c) + l2 * torch.eye(ks.shape[0], dtype=torch.float64),
                                     p @ ks @ resid.T).T
        with torch.no_grad():
            down.weight += upd.float()


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_memit_spread_matches_the_reference_loop(fact_model, method):
    """Item 7 / issue 18: the spread on the model engine (one block-by-block pass: keys from each edited block's
    input after the earlier layers' updates, H_L carried through the later edited blocks) gives the weights of
    the reference's loop over layers on the whole transformers model, for MEMIT's and AlphaEdit's solves."""
    import copy

    from surgeon.kernels.covariance import CholeskyFactor
    from surgeon.ops.edit.nullspace import projected_update
    from surgeon.ops.edit.requests import Request
    from surgeon.ops.edit.site import locate
    from surgeon.ops.edit.solve import ridge_factors
    from surgeon.ops.edit.spread import spread
    from transformers import AutoModelForCausalLM

    from surgeon.context import Context
    from surgeon.engine import SpillStore

    model = AutoModelForCausalLM.from_pretrained(fact_model).eval()
    twin = copy.deepcopy(model)
    tok = _tokenizer()
    reqs = [Request(**_request(i, (i + 4) % len(OBJECTS))) for i in range(3)]
    prefixes = ["it was cold . ", "rain . "]
    layers = [0, 1]
    g = torch.Generator().manual_seed(3)
    covs, alpha = [], []
    for _ in layers:
        x = torch.randn(300, 256, generator=g, dtype=torch.float64)
        covs.append(x.T @ x / 300 + 0.1 * torch.eye(256, dtype=torch.float64))
        basis = torch.linalg.qr(torch.randn(256, 200, generator=g, dtype=torch.float64))[0]
        y = torch.randn(256, 5, generator=g, dtype=torch.float64)
        alpha.append((basis @ basis.T, y @ y.T, 0.5))
    h0 = []
    hook = twin.model.layers[1].register_forward_hook(lambda m, a, o: h0.append(o[0, -1]))
    with torch.no_grad():
        for r in reqs:  # each prompt ends with its subject's token... after "the capital of": the last token
            twin(input_ids=torch.tensor([tok(r.text)["input_ids"]]))
    hook.remove()
    delta = 2.0 * torch.randn(64, 3, generator=g)
    zs = torch.stack(h0, 1) + delta
    lam = 3.0
    ctx = Context(quiet=True)
    graph = _graph(fact_model)
    sites = [locate(graph, x, ctx.roles(graph)) for x in layers]
    if method == "memit":
        def solve(i, r, k):
            return ridge_factors(r, k, CholeskyFactor(covs[i]), lam)
    else:
        def solve(i, r, k):
            return projected_update(r, k, alpha[i][0], alpha[i][1], alpha[i][2])
    res = spread(graph, ctx, tok, sites, reqs, prefixes, delta, solve, spill=SpillStore())
    _reference_memit_loop(twin, tok, reqs, prefixes, layers, zs, covs, lam, alpha if method == "alphaedit" else None)
    for x, site, (up, down) in zip(layers, sites, res.parts):
        ref = twin.model.layers[x].mlp.down_proj.weight
        torch.testing.assert_close(res.weights[site.name].compute([]), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(graph.value(site.name) + (up @ down).float(), ref, rtol=1e-4, atol=1e-5)
        assert res.weights[site.name].dtype == torch.float32
    torch.testing.assert_close(res.start, torch.stack(h0, 1), rtol=1e-5, atol=1e-5)
    # the last layer gets the whole remainder: with a small λ the top layer's output reaches z
    if method == "memit":
        assert float((res.reached - zs).norm()) < 0.5 * float(delta.norm())


def test_memit_edits_facts_over_two_layers(fact_model, tmp_path):
    """Item 7 behaviour: edit.memit on the toy model, both layers written, the edits stick after reloading."""
    from safetensors.torch import load_file

    from surgeon.api import run_op

    stats = _stats_text(tmp_path / "stats.txt")
    out = tmp_path / "edited"
    reqs = [_request(i, (i + 2) % 8) for i in range(4)]
    res = run_op("edit.memit", str(fact_model), output=str(out), device="cpu", requests=reqs, stats_data=stats,
                 n_prefixes=2, layers=[0, 1], lam=100.0)
    info = res["steps"][0]["info"]
    assert info["layers"] == [0, 1] and info["style"]["norm_reference"] == "layer"
    metrics = res["results"][-1]
    assert metrics["efficacy"] == 1.0
    got = _answers(out, [TEMPLATES[0].format(s) for s in SUBJECTS])
    assert got[:4] == [OBJECTS[(i + 2) % 8] for i in range(4)]
    assert sum(a == b for a, b in zip(got[8:], OBJECTS[8:])) >= 15  # untouched facts mostly kept
    before, after = load_file(fact_model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    undo = load_file(out / "edits.safetensors")
    for k in changed:
        assert torch.equal(undo[k + ".original"], before[k])
        torch.testing.assert_close(before[k] + undo[k + ".up"] @ undo[k + ".down"], after[k])


def test_identity_factor_solves_without_building_a_matrix():
    """``--no-cov``: C = I answers C⁻¹x = x exactly (a fresh tensor) and holds no d×d matrix."""
    from surgeon.kernels.covariance import CholeskyFactor

    x = torch.randn(16, 3, dtype=torch.float32)
    f = CholeskyFactor.identity(16)
    assert f.lower is None
    out = f.solve(x)
    assert out.dtype == torch.float64 and torch.equal(out, x.double())
    out[0, 0] = 123.0
    assert float(x[0, 0]) != 123.0
    assert torch.equal(f.solve(x[:, 0]), x[:, 0].double())
