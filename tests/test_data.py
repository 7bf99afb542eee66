"""Calibration/evaluation data: file formats, clear errors, deterministic packing, self-sampled text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgeon.context import Context
from surgeon.data import load_texts, save_word_tokenizer, token_windows
from surgeon.errors import SurgeonError
from surgeon.graph import Graph
from surgeon.sources import open_checkpoint

WORDS = [f"w{i}" for i in range(60)]  # + 4 specials = 64 = the model's vocab


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("data") / "m", layers=2, hidden=32, vocab=64)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 40
    (folder / "config.json").write_text(json.dumps(cfg))
    save_word_tokenizer(folder, WORDS)
    return folder


@pytest.fixture
def graph(model_dir) -> Graph:
    return Graph.from_checkpoint(open_checkpoint(model_dir))


def test_txt_paragraphs_split_on_blank_lines(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first para\nstill first\n\n  \nsecond\n\n\nthird  \n")
    assert load_texts(str(p)) == ["first para\nstill first", "second", "third"]


def test_jsonl_field_and_errors_name_path_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b"}\n\n{"body": "c", "text": "d"}\n')
    assert load_texts(str(p)) == ["a b", "d"]
    p.write_text('{"body": "x"}\n{"body": "y"}\n')
    assert load_texts(str(p), field="body") == ["x", "y"]
    with pytest.raises(SurgeonError, match=r"d\.jsonl:1: no field 'text'"):
        load_texts(str(p))
    p.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(SurgeonError, match=r"d\.jsonl:2: invalid JSON"):
        load_texts(str(p))
    p.write_text('{"text": 3}\n')
    with pytest.raises(SurgeonError, match=r"d\.jsonl:1: field 'text' is int"):
        load_texts(str(p))
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"fine line\nsecond\n\xff\xfe oops\n")
    with pytest.raises(SurgeonError, match=r"b\.txt:3: not UTF-8"):
        load_texts(str(bad))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SurgeonError, match=r"nope\.txt: no such file"):
        load_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(SurgeonError, match=r"e\.txt: contains no text"):
        load_texts(str(tmp_path / "e.txt"))
    with pytest.raises(SurgeonError, match="model:N"):
        load_texts("model:zero")


def test_datasets_folder(tmp_path):
    folder = tmp_path / "ds"
    try:
        import datasets
    except ImportError:
        folder.mkdir()
        with pytest.raises(SurgeonError, match="needs the optional package datasets"):
            load_texts(str(folder))
        return
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"], "n": [1, 2]}).save_to_disk(str(folder))
    assert load_texts(str(folder)) == ["one", "two"]
    with pytest.raises(SurgeonError, match="no column 'body'"):
        load_texts(str(folder), field="body")


def test_windows_are_consecutive_non_overlapping_slices_of_the_stream(tmp_path, graph):
    from surgeon.model import load_tokenizer

    docs = [" ".join(WORDS[(7 * i) % 50: (7 * i) % 50 + 9]) for i in range(20)]
    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(docs))
    w = token_windows(str(p), graph, ctx=Context(), seqlen=16)
    tok = load_tokenizer(graph)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(stream) == 200 and w.dtype == torch.long
    assert w.shape == (200 // 16, 16)
    assert w.flatten().tolist() == stream[: 12 * 16]
    # capped at the model's context (40) and at 2048
    assert token_windows(str(p), graph, seqlen=512).shape == (5, 40)
    # deterministic, and a seeded subset kept in stream order
    a = token_windows(str(p), graph, ctx=Context(seed=3), seqlen=16, max_windows=4)
    b = token_windows(str(p), graph, ctx=Context(seed=3), seqlen=16, max_windows=4)
    c = token_windows(str(p), graph, ctx=Context(seed=4), seqlen=16, max_windows=4)
    assert torch.equal(a, b) and a.shape == (4, 16) and not torch.equal(a, c)
    rows = [next(i for i in range(12) if torch.equal(w[i], r)) for r in a]
    assert rows == sorted(rows)
    with pytest.raises(SurgeonError, match="seqlen"):
        token_windows(str(p), graph, seqlen=1)


def test_short_text_gives_one_window_of_the_whole_stream(tmp_path, graph):
    p = tmp_path / "s.txt"
    p.write_text("w1 w2 w3")
    w = token_windows(str(p), graph, seqlen=32)
    assert w.shape == (1, 4)  # three words and EOS


def test_self_sampled_text_is_deterministic(graph):
    a = token_windows("model:3", graph, ctx=Context(seed=7), seqlen=12)
    b = token_windows("model:3", graph, ctx=Context(seed=7), seqlen=12)
    c = token_windows("model:3", graph, ctx=Context(seed=8), seqlen=12)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < 64 and int(a[:, 0].min()) >= 4  # first tokens are never specials
    assert token_windows("model", graph, seqlen=8, max_windows=2).shape == (2, 8)
    texts = load_texts("model:2", graph=graph, ctx=Context(seed=7), sample_len=6)
    assert len(texts) == 2 and all(len(t.split()) >= 1 for t in texts)
    with pytest.raises(SurgeonError, match="needs a model"):
        load_texts("model:2")


def test_self_samples_come_from_the_runs_input_model_and_are_drawn_once(graph):
    from surgeon.data import sampler_fingerprint
    from surgeon.graph import Const

    changed = graph.copy()
    emb = "model.embed_tokens.weight"
    changed.nodes[emb] = Const(torch.randn(graph[emb].shape, generator=torch.Generator().manual_seed(3)))
    own = token_windows("model:3", changed, ctx=Context(seed=7), seqlen=12)
    dense = token_windows("model:3", graph, ctx=Context(seed=7), seqlen=12)
    assert not torch.equal(own, dense)  # the two models sample different text
    ctx = Context(seed=7, origin=graph)
    first = token_windows("model:3", changed, ctx=ctx, seqlen=12)
    assert torch.equal(first, dense)  # a later step of the run still gets the input model's text
    from surgeon.data import _SAMPLES

    key = (sampler_fingerprint(graph, None), 3, 12, 7)
    assert key in _SAMPLES  # drawn once, shared by later steps and runs on the same input model
    _SAMPLES[key] = torch.zeros(3, 12, dtype=torch.long)
    again = token_windows("model:3", changed, ctx=Context(seed=7, origin=graph.copy()), seqlen=12)
    assert torch.equal(again, torch.zeros(3, 12, dtype=torch.long))
    del _SAMPLES[key]
    assert sampler_fingerprint(changed, ctx) == sampler_fingerprint(graph, None)
    assert sampler_fingerprint(changed, None) != sampler_fingerprint(graph, None)


def test_bos_once_in_front_when_the_tokenizer_adds_it(tmp_path):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "m", layers=1, hidden=32, vocab=64)
    save_word_tokenizer(folder, WORDS, add_bos=True)
    g = Graph.from_checkpoint(open_checkpoint(folder))
    p = tmp_path / "t.txt"
    p.write_text("w5 w6\n\nw7")
    w = token_windows(str(p), g, seqlen=64)
    assert w.tolist() == [[2, 9, 10, 3, 11, 3]]  # <bos> w5 w6 <eos> w7 <eos>


def test_self_samples_are_cached_on_disk_for_later_processes(graph, tmp_path, monkeypatch):
    import surgeon.data as data_mod
    from surgeon.data import _SAMPLES, sampler_fingerprint, samples_cache_path

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    logged: list[str] = []
    ctx = Context(seed=11, origin=graph)
    monkeypatch.setattr(ctx, "log", logged.append)
    first = token_windows("model:2", graph, ctx=ctx, seqlen=10)
    path = samples_cache_path(sampler_fingerprint(graph, None), 2, 10, 11)
    assert path.is_file() and any("sampling 2 × 10 tokens" in m for m in logged)
    _SAMPLES.clear()  # a new process: only the disk cache is left

    def no_sampling(*_a, **_k):
        raise AssertionError("sampled again although the disk cache has the samples")

    monkeypatch.setattr(data_mod, "sample_token_sequences", no_sampling)
    ctx2 = Context(seed=11, origin=graph.copy())
    monkeypatch.setattr(ctx2, "log", logged.append)
    again = token_windows("model:2", graph, ctx=ctx2, seqlen=10)
    assert torch.equal(first, again) and "sampled from the model earlier" in logged[-1]
    path.write_bytes(b"damaged")  # a damaged entry is resampled, never trusted
    _SAMPLES.clear()
    monkeypatch.undo()
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    assert torch.equal(token_windows("model:2", graph, ctx=Context(seed=11, origin=graph.copy()), seqlen=10), first)
