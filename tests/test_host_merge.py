"""The torch-free linear merge: the C kernel gives torch's (and so mergekit's) bytes, and ``merge linear`` on
safetensors inputs runs without importing torch, writing the same files as the torch path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from surgeon.ops.merge import classic

from surgeon.api import run_op
from surgeon.kernels import host_merge
from surgeon.kernels.host_dtypes import STORAGE
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


def test_merge_linear_runs_without_torch_and_writes_the_torch_paths_bytes(tmp_path, monkeypatch):
    base = save_tiny_llama(tmp_path / "base", layers=2, hidden=32, vocab=64)
    a = perturbed_copy(base, tmp_path / "a", seed=1)
    b = perturbed_copy(base, tmp_path / "b", seed=2, dtype=torch.bfloat16)
    out_host, out_torch = tmp_path / "host", tmp_path / "torch"
    code = ("import sys\nfrom surgeon.cli import main\n"
            f"rc = main(['merge', 'linear', {str(a)!r}, {str(b)!r}, '--weights', '0.3,0.9', '--dtype', 'bfloat16',"
            f" '-q', '-o', {str(out_host)!r}])\n"
            "sys.exit(3 if 'torch' in sys.modules else rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"rc {r.returncode} (3: torch was imported): {r.stderr[-2000:]}"
    monkeypatch.setattr(classic, "host_merge_available", lambda dtypes: False)
    run_op("merge.linear", {"a": str(a), "b": str(b)}, output=str(out_torch), weights=[0.3, 0.9], dtype="bfloat16")
    host, ref = load_file(out_host / "model.safetensors"), load_file(out_torch / "model.safetensors")
    assert sorted(host) == sorted(ref)
    for name, t in ref.items():
        assert host[name].dtype == t.dtype == torch.bfloat16
        assert torch.equal(host[name].view(torch.uint8), t.view(torch.uint8)), name
