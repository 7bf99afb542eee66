"""The torch-free linear and TIES merges: the C kernels give torch's (and so mergekit's) bytes, and ``merge
linear``/``merge ties`` on safetensors inputs run without importing torch, writing the same files as the torch
path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from surgeon.kernels import host_merge
from surgeon.kernels.host_dtypes import STORAGE
from surgeon.ops.merge import classic

from surgeon.api import run_op
from surgeon.tensorfile import HostArray
from tests.conftest import save_tiny_llama
from tests.test_merge_helpers import perturbed_copy

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not host_merge.available(["float32"]), reason="no C compiler for the host kernel")


def mergekit_linear(values: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Oracle: mergekit 0.1.5's linear merge as it computes on CPU (addcmul per model into fp32 zeros, then a
    division by the sum of the weights)."""
    out = torch.zeros(values[0].shape, dtype=torch.float32)
    for v, w in zip(values, weights):
        out.addcmul_(v.float(), torch.tensor(w, dtype=torch.float32))
    total = sum(weights)
    if normalize and abs(total) > 1e-8:
        out.div_(total)
    return out


def _storage(t: torch.Tensor) -> np.ndarray:
    name = str(t.dtype).removeprefix("torch.")
    return t.contiguous().view(torch.uint8).numpy().view(STORAGE[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weighted_sum_bytes_equal_the_torch_oracle(dtype):
    g = torch.Generator().manual_seed(0)
    cases = 0
    for n in (1, 7, 8, 17, 63, 4097, 1 << 20 | 5):
        for k, weights, normalize in ((1, [0.5], True), (2, [0.3, 0.7], True), (3, [1.7, -0.45, 0.013], False),
                                      (2, [0.25, 0.1], True)):
            values = [torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-38, 30, (), generator=g))
                      for _ in range(k)]
            if n > 4:  # subnormals, signed zeros, values near the fp32 maximum
                values[0][:4] = torch.tensor([1e-42, -0.0, 3.0e38, -2.9e38])
            values = [v.to(dtype) for v in values]
            want = mergekit_linear(values, weights, normalize)
            total = sum(weights)
            got = host_merge.weighted_sum([_storage(v) for v in values], [str(dtype)[6:]] * k, weights,
                                          total if normalize else None)
            assert np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32)), (n, k, weights)
            cases += 1
    assert cases == 28


def mergekit_ties(base: torch.Tensor, values: list[torch.Tensor], weights: list[float], densities: list[float],
                  lam: float, normalize: bool) -> torch.Tensor:
    """Oracle: mergekit 0.1.5's TIES on CPU, literally: ``magnitude`` (argsort of |τ|, keep the first k) per
    model, then ``merge_group`` with the ``sum`` consensus."""
    base = base.float()
    deltas = []
    for v, d in zip(values, densities):
        delta = v.float() - base
        if d < 1:
            k = int(d * delta.numel())
            mask = torch.zeros_like(delta)
            mask.view(-1)[torch.argsort(delta.abs().view(-1), descending=True)[:k]] = 1
            delta = delta * mask
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    stacked = stacked * w
    sign = stacked.sign()
    majority = (stacked.sum(0) >= 0).float() * 2 - 1
    agree = (sign == majority).float()
    mixed = (stacked * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base + lam * mixed


@pytest.mark.parametrize("n_models", [1, 2, 3, 4, 5])
def test_host_ties_bytes_equal_the_mergekit_oracle(n_models):
    g = torch.Generator().manual_seed(n_models)
    for n, dtype, trial in ((1, torch.float32, 0), (17, torch.float32, 1), (4099, torch.bfloat16, 2),
                            (300_001, torch.float32, 0), (300_001, torch.float32, 1), (65_537, torch.float16, 2)):
        base = torch.randn(n, generator=g)
        if trial == 0:
            base[: n // 5] = -0.0  # signed zeros meet zero sums
        steps = torch.randint(-3, 4, (n_models, n), generator=g) * 0.25  # many equal |τ|: ties at the threshold
        values = [(base + steps[i] if trial < 2 else base + torch.randn(n, generator=g)) for i in range(n_models)]
        if trial == 1:
            for v in values:
                v[: n // 3] = base[: n // 3]  # unchanged entries: zero task vectors
        base, values = base.to(dtype), [v.to(dtype) for v in values]
        weights = [1.0, 0.7, -0.3, 1.2, 0.5][:n_models]
        densities = [0.5, 0.3, 1.0, 0.9, 0.0][:n_models]
        lam, normalize = (1.0, True) if trial != 1 else (0.7, False)
        want = mergekit_ties(base, values, weights, densities, lam, normalize)
        st = str(dtype).removeprefix("torch.")
        masks = host_merge.trim_masks(_storage(base), st, [_storage(v) for v in values], [st] * n_models, densities)
        got = host_merge.ties_combine(_storage(base), st, [_storage(v) for v in values], [st] * n_models, masks,
                                      weights, scale=lam, normalize=normalize)
        assert np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32)), (n, dtype, trial)


@pytest.mark.parametrize("scale,normalize", [(1.0, False), (0.6, False), (1.3, True)])
def test_host_task_arithmetic_bytes_equal_the_torch_oracle(scale, normalize):
    """Oracle: θ_b + λ·Σ w_i (θ_i − θ_b) with torch's fused CPU kernels, written out (addcmul per model from
    zeros, the division, then addcmul with λ, or a plain add when λ = 1)."""
    g = torch.Generator().manual_seed(7)
    for n, k, dtype in ((1, 1, torch.float32), (19, 2, torch.float32), (4099, 3, torch.bfloat16),
                        (300_001, 2, torch.float32), (65_537, 4, torch.float16)):
        base = torch.randn(n, generator=g).to(dtype)
        values = [(base.float() + torch.randn(n, generator=g) * 0.1).to(dtype) for _ in range(k)]
        weights = [0.7, -0.2, 1.1, 0.4][:k]
        b = base.float()
        acc = torch.zeros(n)
        for v, w in zip(values, weights):
            acc.addcmul_(v.float() - b, torch.tensor(w, dtype=torch.float32))
        if normalize:
            acc.div_(sum(weights))
        want = b + acc if scale == 1.0 else torch.addcmul(b, acc, torch.tensor(scale, dtype=torch.float32))
        st = str(dtype).removeprefix("torch.")
        got = host_merge.task_arithmetic(_storage(base), st, [_storage(v) for v in values], [st] * k, weights,
                                         divisor=sum(weights) if normalize else None, scale=scale)
        assert np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32)), (n, k, dtype)
        host = classic.task_arithmetic_host(HostArray(_storage(base), st, (n,)),
                                            [HostArray(_storage(v), st, (n,)) for v in values], weights,
                                            scale=scale, normalize=normalize)
        torch_path = classic.task_arithmetic(base, values, weights, scale=scale, normalize=normalize)
        assert np.array_equal(host.data.view(np.uint32), torch_path.numpy().view(np.uint32))


@pytest.mark.parametrize("op,cli,params,switch", [
    ("merge.linear", ["--weights", "0.3,0.9", "--dtype", "bfloat16"], {"weights": [0.3, 0.9], "dtype": "bfloat16"},
     "host_merge_available"),
    ("merge.task-arithmetic", ["--base", "{base}", "--weights", "0.5,0.8", "--scale", "0.7"],
     {"weights": [0.5, 0.8], "scale": 0.7}, "host_merge_available"),
    ("merge.ties", ["--base", "{base}", "--density", "0.4", "--weights", "1,0.6", "--scale", "0.9"],
     {"density": 0.4, "weights": [1.0, 0.6], "scale": 0.9}, "host_ties_available"),
])
def test_cli_merge_runs_without_torch_and_writes_the_torch_paths_bytes(tmp_path, monkeypatch, op, cli, params,
                                                                       switch):
    base = save_tiny_llama(tmp_path / "base", layers=2, hidden=32, vocab=64)
    a = perturbed_copy(base, tmp_path / "a", seed=1)
    b = perturbed_copy(base, tmp_path / "b", seed=2, dtype=torch.bfloat16)
    out_host, out_torch = tmp_path / "host", tmp_path / "torch"
    args = ["merge", op.split(".")[1], str(a), str(b), *(x.format(base=base) for x in cli), "-q", "-o", str(out_host)]
    code = f"import sys\nfrom surgeon.cli import main\nrc = main({args!r})\nsys.exit(3 if 'torch' in sys.modules else rc)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"rc {r.returncode} (3: torch was imported): {r.stderr[-2000:]}"
    monkeypatch.setattr(classic, switch, lambda *args: False)  # the torch path
    models = {"a": str(a), "b": str(b)} if "--base" not in cli else {"base": str(base), "a": str(a), "b": str(b)}
    run_op(op, models, base="base" if "--base" in cli else None, output=str(out_torch), **params)
    host, ref = load_file(out_host / "model.safetensors"), load_file(out_torch / "model.safetensors")
    assert sorted(host) == sorted(ref)
    for name, t in ref.items():
        assert host[name].dtype == t.dtype
        assert torch.equal(host[name].view(torch.uint8), t.view(torch.uint8)), name


def test_frankenmerge_of_safetensors_inputs_imports_no_torch(tmp_path):
    """Passed-through slices are byte copies: the run needs no torch (it used to seed torch's RNG anyway)."""
    base = save_tiny_llama(tmp_path / "base", layers=2, hidden=32, vocab=64)
    a = perturbed_copy(base, tmp_path / "a", seed=1)
    out = tmp_path / "out"
    slices = f"[{{model: {a}, layers: [0, 2]}}, {{model: {base}, layers: [1, 2]}}]"
    args = ["merge", "passthrough", str(a), str(base), "--slices", slices, "-q", "-o", str(out)]
    code = f"import sys\nfrom surgeon.cli import main\nrc = main({args!r})\nsys.exit(3 if 'torch' in sys.modules else rc)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"rc {r.returncode} (3: torch was imported): {r.stderr[-2000:]}"
    written = load_file(out / "model.safetensors")
    assert torch.equal(written["model.layers.2.mlp.up_proj.weight"],
                       load_file(base / "model.safetensors")["model.layers.1.mlp.up_proj.weight"])
