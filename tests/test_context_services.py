"""The Context's file services (read, cache, state, attach), run-level roles and seeds, and the graph edit API."""
from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load, save_file

from surgeon.context import Context
from surgeon.errors import SurgeonError
from surgeon.graph import Const, Graph


def _graph(*names: str) -> Graph:
    return Graph({n: Const(torch.full((2,), float(i)), label=n) for i, n in enumerate(names)})


def test_edit_api_keeps_model_order():
    g = _graph("a", "b", "c")
    g.replace("b", Const(torch.zeros(3)))
    assert g.names() == ["a", "b", "c"] and g["b"].shape == (3,)
    g.insert_after("a", {"a2": Const(torch.ones(1)), "a3": Const(torch.ones(1))})
    assert g.names() == ["a", "a2", "a3", "b", "c"]
    g.splice("b", {"b.q": Const(torch.ones(1)), "b.s": Const(torch.ones(1))})
    assert g.names() == ["a", "a2", "a3", "b.q", "b.s", "c"]
    g.remove("a2", "a3")
    g.add("d", Const(torch.ones(1)))
    assert g.names() == ["a", "b.q", "b.s", "c", "d"]
    g.reorder(["d", "a", "x"], {"x": Const(torch.ones(4))})
    assert g.names() == ["d", "a", "x"]
    g.rename({"d": "e"})
    assert g.names() == ["e", "a", "x"]


@pytest.mark.parametrize("call", [
    lambda g: g.replace("zz", Const(torch.ones(1))),
    lambda g: g.add("a", Const(torch.ones(1))),
    lambda g: g.insert_after("a", {"b": Const(torch.ones(1))}),
    lambda g: g.remove("zz"),
    lambda g: g.reorder(["a", "zz"]),
    lambda g: g.reorder(["a", "a"]),
    lambda g: g.rename({"a": "b"}),
])
def test_edit_api_refuses_bad_edits(call):
    g = _graph("a", "b")
    with pytest.raises(SurgeonError):
        call(g)
    assert g.names() == ["a", "b"]


def test_read_names_option_and_path(tmp_path):
    ctx = Context()
    (tmp_path / "r.json").write_text('{"a": 1}')
    assert ctx.read_json(str(tmp_path / "r.json"), what="--requests") == {"a": 1}
    with pytest.raises(SurgeonError, match=r"^--requests: .*nope\.json does not exist"):
        ctx.read(str(tmp_path / "nope.json"), what="--requests")
    with pytest.raises(SurgeonError, match="is a folder"):
        ctx.read(str(tmp_path), what="--facts")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SurgeonError, match=r"--facts: .*bad\.json: invalid JSON \(line 1"):
        ctx.read_json(str(tmp_path / "bad.json"), what="--facts")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SurgeonError, match="not UTF-8"):
        ctx.read_text(str(tmp_path / "bin.txt"), what="--data")


def test_cache_roundtrip_miss_on_damage_and_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path))
    ctx = Context()
    entry = ctx.cache("stats", "abc123")
    assert entry.load() is None
    entry.save({"m": torch.arange(4.0)}, {"layer": "3"})
    assert entry.path == tmp_path / "stats" / "abc123.safetensors"
    assert torch.equal(ctx.cache("stats", "abc123").load()["m"], torch.arange(4.0))
    entry.path.write_bytes(b"garbage")
    assert ctx.cache("stats", "abc123").load() is None
    off = Context(use_cache=False).cache("stats", "zzz")
    off.save({"m": torch.ones(1)})
    assert not off.path.exists() and off.load() is None
    with pytest.raises(SurgeonError):
        ctx.cache("stats", "../escape")


def test_state_folder_user_kept_and_temporary_removed(tmp_path):
    ctx = Context()
    st = ctx.state(str(tmp_path / "st"), what="--state")
    spill = st.spill("t.safetensors", {"x": (2, 3), "y": (4,)})
    spill.write("x", torch.ones(2, 3))
    with pytest.raises(SurgeonError, match="out of order"):
        spill.write("x", torch.ones(2, 3))
    spill.write("y", torch.arange(4.0))
    spill.close()
    st.write_json("meta.json", {"count": 2})
    again = ctx.state(str(tmp_path / "st"), what="--resume")
    assert again.read_json("meta.json") == {"count": 2}
    ck = again.tensors("t.safetensors")
    assert torch.equal(ck.load("y"), torch.arange(4.0))
    with pytest.raises(SurgeonError, match="missing nothere.json"):
        again.read_json("nothere.json")

    tmp = ctx.state(None, what="state")
    folder = tmp.path
    s2 = tmp.spill("t.safetensors", {"x": (2,)})
    s2.write("x", torch.ones(2))
    s2.close()
    reader = tmp.tensors("t.safetensors")
    del tmp
    gc.collect()
    assert folder.exists()  # a lazy reader still points into it
    assert torch.equal(reader.load("x"), torch.ones(2))
    del reader
    gc.collect()
    assert not folder.exists()


def test_spill_abort_and_short_write_leave_nothing(tmp_path):
    st = Context().state(str(tmp_path), what="state")
    s = st.spill("a.safetensors", {"x": (1,), "y": (1,)})
    s.write("x", torch.ones(1))
    with pytest.raises(SurgeonError, match="never written"):
        s.close()
    s = st.spill("a.safetensors", {"x": (1,)})
    s.abort()
    assert list(tmp_path.iterdir()) == []


def test_spill_bytes_load_with_safetensors(tmp_path):
    st = Context().state(str(tmp_path), what="state")
    s = st.spill("b.safetensors", {"w": (3, 2)}, dtype="bfloat16")
    w = torch.randn(3, 2)
    s.write("w", w)
    s.close()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "b.safetensors"))["w"], w.to(torch.bfloat16))


def test_attach_text_and_tensors():
    g = _graph("a")
    ctx = Context()
    ctx.attach(g, "report.json", json.dumps({"x": 1}))
    ctx.attach(g, "undo.safetensors", {"u": torch.ones(2)}, metadata={"k": "v"})
    assert json.loads(g.extra_files["report.json"]) == {"x": 1}
    assert torch.equal(load(g.extra_files["undo.safetensors"])["u"], torch.ones(2))


def test_roles_apply_run_overrides_then_op_overrides(tmp_path):
    names = [f"blk.{i}.{s}.weight" for i in range(2) for s in ("q", "k", "v", "o", "up", "down")]
    g = Graph({n: Const(torch.zeros(4, 4)) for n in names}, {"": {"model_type": "made-up"}})
    with pytest.raises(SurgeonError):
        Context().roles(g)
    layout = {"layers": "blk.{i}.", "attn.q": "q.weight", "mlp.down": "down.weight"}
    r = Context(arch=layout).roles(g)
    assert r.n_layers == 2 and r.tensor(1, "attn.q") == "blk.1.q.weight"
    r1 = Context(arch=layout).roles(g, overrides={"attn.q": "k.weight"})
    assert r1.tensor(0, "attn.q") == "blk.0.k.weight" and r1.tensor(0, "mlp.down") == "blk.0.down.weight"


def test_seed_for_offsets_the_run_seed():
    assert Context(seed=7).seed_for(3) == 10 and Context(seed=7).seed_for() == 7


def test_open_source_names_the_source(tmp_path):
    with pytest.raises(SurgeonError, match="nothing"):
        Context().open_source(str(tmp_path / "nothing"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    assert Context().open_source(str(tmp_path / "m.safetensors")).tensors["w"].shape == (2,)


def test_fingerprint_of_file_and_folder_and_missing(tmp_path):
    import hashlib

    ctx = Context()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_bytes(b"beta")
    (tmp_path / "d" / "a.txt").write_bytes(b"alpha")
    # oracle: names (relative, sorted) and bytes in turn
    want = hashlib.sha256(b"a.txt" + b"alpha" + b"b.txt" + b"beta").hexdigest()
    assert ctx.fingerprint(str(tmp_path / "d"), what="--data") == want
    assert ctx.fingerprint(str(tmp_path / "d" / "a.txt"), what="--data") == hashlib.sha256(
        b"a.txt" + b"alpha").hexdigest()
    assert ctx.fingerprint("model:64", what="--data") is None


def test_tokenizer_from_folder_hub_cache_and_errors(tmp_path):
    ctx = Context()
    assert ctx.tokenizer_from(None, cls="CLIPTokenizer", hub_repo="surgeon-tests/not-cached", what="tok") is None
    with pytest.raises(SurgeonError, match=r"--tokenizer: .*nope is not a folder"):
        ctx.tokenizer_from(str(tmp_path / "nope"), cls="CLIPTokenizer", what="--tokenizer")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.json").write_text("{not json")
    (tmp_path / "bad" / "merges.txt").write_text("")
    with pytest.raises(SurgeonError, match=r"--tokenizer: .*bad: cannot load a CLIPTokenizer"):
        ctx.tokenizer_from(str(tmp_path / "bad"), cls="CLIPTokenizer", what="--tokenizer")
