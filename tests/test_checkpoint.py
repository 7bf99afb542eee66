"""Checkpoint reading: header validation before any tensor is read, sharded folders, pickle refusal."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgeon.checkpoint import parse_safetensors_header
from surgeon.errors import SurgeonError
from surgeon.sources import open_checkpoint


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_tensor_equal_to_safetensors(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).to(torch.bfloat16)}
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ck = open_checkpoint(tmp_path)
    assert set(ck.tensors) == {"a", "b", "c"}
    for k, v in t.items():
        assert torch.equal(ck.load(k), v)
    assert ck.tensors["a"].shape == (3, 5) and ck.tensors["c"].dtype == "bfloat16"


def _maps_of(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_loaded_tensors_are_private_maps_released_with_them(tmp_path):
    """A loaded tensor maps the file copy-on-write (or, at an offset that is not 64-byte aligned, is an aligned
    copy for computations): writing to it leaves the file alone, the map goes away with the last array that views
    it, and a file truncated after opening is named, not a crash (SIGBUS)."""
    w = torch.randn(600, 700)
    save_file({"w": w, "odd": torch.ones(3, dtype=torch.bool), "h": torch.randn(5).half()},
              tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    before = path.read_bytes()
    ck = open_checkpoint(tmp_path)
    t = ck.load("w")
    assert t.data_ptr() % 64 == 0 and torch.equal(t, w)
    t.mul_(0)  # an op changing a loaded tensor in place
    assert path.read_bytes() == before and torch.equal(ck.load("w"), w)
    host = ck.load_host("w")
    assert _maps_of(path) >= 1 and host.data.tobytes() == w.numpy().tobytes()
    host.data[:4] = 0  # private: the file is untouched
    assert path.read_bytes() == before
    del t, host
    import gc

    gc.collect()
    assert _maps_of(path) == 0
    with open(path, "r+b") as fh:
        fh.truncate(len(before) - 100)
    with pytest.raises(SurgeonError, match="model.safetensors: file ends at byte"):
        ck.load("w")


def test_truncated_file_is_refused(tmp_path):
    save_file({"a": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(SurgeonError, match="model.safetensors.*past the data buffer"):
        open_checkpoint(tmp_path)


def test_header_length_past_end(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(SurgeonError, match="runs past the end"):
        parse_safetensors_header(p)


def test_offsets_past_end_and_overlap_and_dtype(tmp_path):
    p = _write_raw(tmp_path / "a.safetensors",
                   {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    with pytest.raises(SurgeonError, match="overlap"):
        parse_safetensors_header(p)
    p = _write_raw(tmp_path / "b.safetensors", {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}},
                   b"\0" * 16)
    with pytest.raises(SurgeonError, match="'w'.*unknown dtype 'Q4'"):
        parse_safetensors_header(p)
    p = _write_raw(tmp_path / "c.safetensors", {"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}},
                   b"\0" * 16)
    with pytest.raises(SurgeonError, match="needs 20 bytes"):
        parse_safetensors_header(p)


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.ones(2)}, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"b": torch.zeros(3)}, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {"metadata": {"total_size": 20}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                              "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    return d


def test_sharded_folder_and_side_files(tmp_path):
    ck = open_checkpoint(_sharded(tmp_path))
    assert torch.equal(ck.load("a"), torch.ones(2)) and torch.equal(ck.load("b"), torch.zeros(3))
    assert ck.config == {"model_type": "llama"}
    assert list(ck.side_files) == ["tokenizer.json"]


def test_index_missing_shard_and_traversal(tmp_path):
    d = _sharded(tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["b"] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(SurgeonError, match="model-00009-of-00009.safetensors.*missing"):
        open_checkpoint(d)
    idx["weight_map"]["b"] = "../evil.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(SurgeonError, match="outside the folder"):
        open_checkpoint(d)


def test_symlinked_shard_outside_folder_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"a": torch.ones(2)}, outside)
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(outside)
    with pytest.raises(SurgeonError, match="outside the checkpoint folder"):
        open_checkpoint(d)


def test_pickle_refused_unless_allowed(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    torch.save({"w": torch.arange(4.0)}, d / "pytorch_model.bin")
    with pytest.raises(SurgeonError, match="pickle.*--allow-pickle"):
        open_checkpoint(d)
    ck = open_checkpoint(d, allow_pickle=True)
    assert torch.equal(ck.load("w"), torch.arange(4.0))


def test_missing_source_and_bad_file_type(tmp_path):
    with pytest.raises(SurgeonError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SurgeonError, match="unsupported file type"):
        open_checkpoint(tmp_path / "x.txt")
    with pytest.raises(SurgeonError, match="cached Hub repo.*--online"):
        open_checkpoint("someone/not-cached-model-xyz")


def test_header_fuzz_only_raises_surgeon_error(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    target = tmp_path / "fuzz.safetensors"
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "I8", "BOOL", "XX", 3]),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3)),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=0, max_size=3), st.none()),
    })
    headers = st.one_of(st.dictionaries(st.text(max_size=4), entry, max_size=4),
                        st.lists(st.integers(), max_size=2), st.text(max_size=5))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(headers, st.binary(max_size=64), st.booleans())
    def run(header, data, corrupt):
        raw = json.dumps(header).encode()
        if corrupt:
            raw = raw[: len(raw) // 2]
        target.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        try:
            parse_safetensors_header(target)
        except SurgeonError:
            pass

    run()
