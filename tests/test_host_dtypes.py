"""Casts and NaN/Inf checks on raw storage (numpy, no torch) give exactly torch's bytes, and a cast, drop or
rename through the CLI or the Python API never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from surgeon.kernels import host_dtypes
from surgeon.kernels.host_dtypes import CHUNK, STORAGE, convert, has_nan, has_nonfinite

FLOATS = ["float64", "float32", "float16", "bfloat16"]
ROOT = Path(__file__).resolve().parents[1]
WIDE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(dtype: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random bit patterns: every class of value (NaN with any payload, ±Inf, subnormals, ±0)."""
    width = np.dtype(STORAGE[dtype]).itemsize
    return rng.integers(0, 2 ** (8 * width), size=n, dtype=np.uint64).astype(WIDE[width])


def _special_f32() -> np.ndarray:
    """float32 patterns where rounding rules show: halfway cases for bfloat16 (low 16 bits 0x8000) and float16
    (low 13 bits 0x1000), both parities, the overflow edges, float16's subnormal range, signalling NaNs."""
    hi = np.arange(0, 1 << 16, 7, dtype=np.uint32) << 16
    f16_normal = np.arange(0x38800000, 0x47800000, 0x2000 * 97, dtype=np.uint32)
    return np.concatenate([
        hi | 0x8000, hi | 0x8001, hi | 0x7FFF,
        f16_normal | 0x1000, f16_normal | 0x1001, f16_normal | 0x0FFF,
        np.arange(0x33000000, 0x38800000, 4099, dtype=np.uint32),
        np.array([0x7F7F8000, 0x7F7F7FFF, 0x477FF000, 0x477FEFFF, 0x7F800001, 0xFF800001, 0x7FFFFFFF,
                  0xFFFF8001, 0xFFFFFFFF, 0x00000001, 0x80000001], dtype=np.uint32),
    ])


def _torch_cast(bits: np.ndarray, src: str, dst: str) -> bytes:
    t = torch.from_numpy(bits.view(np.uint8).copy()).view(getattr(torch, src))
    return t.to(getattr(torch, dst)).view(torch.uint8).numpy().tobytes()


def _sources(src: str, rng: np.random.Generator):
    yield _bits(src, 3 * CHUNK + 1234, rng)  # several chunks and a ragged end
    nan = {"float64": 0x7FF0000000000001, "float32": 0x7F800001, "float16": 0x7C01, "bfloat16": 0x7F81}[src]
    for n in (1, 5, 16, 17, 33):  # NaN only: torch's scalar tails and vector bodies
        yield np.full(n, nan, dtype=WIDE[np.dtype(STORAGE[src]).itemsize])
    if src == "float32":
        yield _special_f32()
    if src == "float64":  # float64 values next to float32 ties: the double rounding through float32 shows
        with np.errstate(invalid="ignore"):
            f32 = _special_f32().view(np.float32).astype(np.float64).view(np.uint64)
        yield np.concatenate([f32, f32 ^ 1, f32 ^ (1 << 28), f32 ^ (1 << 29)])
    if src in ("float16", "bfloat16"):
        yield np.arange(1 << 16, dtype=np.uint16)  # every value there is


@pytest.mark.parametrize("c_kernel", [True, False])
@pytest.mark.parametrize(("src", "dst"), [(s, d) for s in FLOATS for d in FLOATS if s != d])
def test_host_cast_gives_torch_bytes(src, dst, c_kernel, monkeypatch):
    if not c_kernel:  # the numpy steps, as on a machine without a C compiler
        monkeypatch.setattr("surgeon.kernels.host_dtypes._f32_to_bf16_c", lambda x, out: False)
        monkeypatch.setattr("surgeon.kernels.host_dtypes._to_f16_c", lambda x, src, out: False)
    elif (src, dst) == ("float32", "bfloat16") and host_dtypes._f32_to_bf16_library() is None:
        pytest.skip("no C compiler: the C kernel is not built")
    elif src in ("float32", "bfloat16") and dst == "float16" and host_dtypes._to_f16_library() is None:
        pytest.skip("no F16C or no C compiler: the F16C kernel is not built")
    rng = np.random.default_rng(FLOATS.index(src) * 4 + FLOATS.index(dst))
    for bits in _sources(src, rng):
        got = convert(bits.view(STORAGE[src]), src, dst)
        assert got.dtype == STORAGE[dst] and got.size == bits.size
        want = _torch_cast(bits, src, dst)
        if got.tobytes() != want:
            w = np.frombuffer(want, dtype=WIDE[got.itemsize])
            bad = np.flatnonzero(got.view(w.dtype) != w)
            pytest.fail(f"{src}->{dst}: {bad.size} of {bits.size} differ, e.g. {hex(bits[bad[0]])} -> "
                        f"{hex(got.view(w.dtype)[bad[0]])}, torch {hex(w[bad[0]])}")


@pytest.mark.parametrize("dst", ["bfloat16", "float16"])
def test_float32_casts_of_unaligned_storage(dst):
    """A source tensor may sit at any byte offset of its file: the C kernels get an aligned copy, same bytes."""
    bits = _special_f32()
    raw = np.zeros(bits.nbytes + 1, dtype=np.uint8)
    raw[1:] = bits.view(np.uint8)
    unaligned = raw[1:].view(np.float32)
    assert not unaligned.flags.aligned
    assert convert(unaligned, "float32", dst).tobytes() == _torch_cast(bits, "float32", dst)


@pytest.mark.parametrize("dtype", [*FLOATS, "float8_e4m3fn", "float8_e5m2"])
def test_nonfinite_check_agrees_with_torch_isfinite(dtype):
    rng = np.random.default_rng(7)
    width = np.dtype(STORAGE[dtype]).itemsize
    tdt = getattr(torch, dtype)
    finite_pool = torch.randn(5000).to(tdt)  # values that are all finite
    assert bool(torch.isfinite(finite_pool.float()).all())
    finite = finite_pool.view(getattr(torch, {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}[width])).numpy()
    assert not has_nonfinite(finite.view(STORAGE[dtype]), dtype)
    for _ in range(40):
        bits = _bits(dtype, 200, rng)
        t = torch.from_numpy(bits.view(np.uint8).copy()).view(tdt)
        expected = not bool(torch.isfinite(t.float() if width == 1 else t).all())
        assert has_nonfinite(bits.view(STORAGE[dtype]), dtype) == expected
    if dtype in FLOATS:
        big = (np.full(10, 0x7F7F, dtype=np.uint16) if dtype == "bfloat16"  # the largest finite values
               else np.full(10, np.finfo(STORAGE[dtype]).max, dtype=STORAGE[dtype]))
        assert not has_nonfinite(big, dtype)  # a sum that overflows is not a non-finite value
        assert not has_nan(big, dtype)


def _checkpoint(folder: Path, *, nan: bool = False) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 77, generator=g)
    w[0, :4] = torch.tensor([1e-40, -0.0, 3.0e38, 1.00390625])  # subnormal, -0, float16 overflow, a tie
    if nan:
        w[1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file({"a.weight": w, "b.norm.weight": torch.randn(77, generator=g).double(),
               "c.weight": torch.randn(33, 5, generator=g).half(), "ids": torch.arange(11)},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic", "torch_dtype": "float32"}))
    return folder


def _run_without_torch(code: str) -> None:
    probe = code + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]


def test_cast_drop_rename_never_import_torch_and_cast_like_torch(tmp_path):
    src = _checkpoint(tmp_path / "src")
    nan_src = _checkpoint(tmp_path / "nan", nan=True)
    out = tmp_path / "out"
    _run_without_torch(
        "from surgeon.api import run_op\n"
        f"run_op('cast', {str(src)!r}, output={str(out / 'api')!r}, dtype='bfloat16',"
        " keep_dtype={'norm': 'float16'})\n"
        "from surgeon.cli import main\n"
        f"assert main(['cast', {str(nan_src)!r}, '--dtype', 'float16', '--allow-nonfinite', '-q',"
        f" '-o', {str(out / 'cli')!r}]) == 0\n"
        f"assert main(['drop', {str(src)!r}, '--pattern', '^ids$', '-q', '-o', {str(out / 'drop')!r}]) == 0\n"
        f"assert main(['rename', {str(src)!r}, '--pattern', 'weight', '--replacement', 'w', '-q',"
        f" '-o', {str(out / 'rename')!r}]) == 0\n"
    )
    for folder, source, to in (("api", src, {"b.norm.weight": torch.float16}), ("cli", nan_src, {})):
        written = load_file(out / folder / "model.safetensors")
        for name, t in load_file(source / "model.safetensors").items():
            default = torch.bfloat16 if folder == "api" else torch.float16
            want = t.to(to.get(name, default)) if t.is_floating_point() else t
            assert written[name].dtype == want.dtype
            assert torch.equal(written[name].view(torch.uint8), want.view(torch.uint8)), (folder, name)
    assert sorted(load_file(out / "drop" / "model.safetensors")) == ["a.weight", "b.norm.weight", "c.weight"]
    assert "a.w" in load_file(out / "rename" / "model.safetensors")
    assert json.loads((out / "api" / "config.json").read_text())["dtype"] == "bfloat16"


def test_nan_in_a_cast_source_is_refused_without_torch(tmp_path):
    src = _checkpoint(tmp_path / "src", nan=True)
    _run_without_torch(
        "from surgeon.cli import main\n"
        f"assert main(['cast', {str(src)!r}, '--dtype', 'bfloat16', '-q', '-o', {str(tmp_path / 'o')!r}]) == 2\n"
    )
    assert not (tmp_path / "o").exists()
