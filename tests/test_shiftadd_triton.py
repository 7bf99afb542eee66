"""Triton LUT GEMV (issue 11): correct by construction, checked on CPU with Triton's interpreter.

Skipped when triton is not installed (``pip install 'surgeon[gpu]'`` or ``pip install --no-deps triton``: the
interpreter needs no GPU and no CUDA build of torch)."""
from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # the interpreter flag is read when triton's own @jit helpers (tl.sum, ...) are decorated: set it first
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file alone",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from oracles.shiftadd import lut_gemv_reference
from surgeon.kernels.shiftadd_cpu import lut_gemv


@pytest.fixture(scope="module")
def tk():
    """The kernel module: compiled for the GPU when there is one, else run by the interpreter on CPU."""
    import surgeon.kernels.shiftadd_triton as mod

    if not torch.cuda.is_available():
        mod = importlib.reload(mod)  # decorated under TRITON_INTERPRET=1 even if imported earlier
    return mod, "cuda" if torch.cuda.is_available() else "cpu"


def _packed(q, n, k, gs, seed):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(0, 256, (q, n, -(-k // 8)), dtype=torch.uint8, generator=g)
    if k % 8:
        qw[..., -1] &= (1 << (k % 8)) - 1
    return qw, torch.randn(q, n, -(-k // gs), generator=g), torch.randn(8, k, generator=g)


@pytest.mark.parametrize("q,n,k,gs,m", [(3, 37, 200, 40, 1), (2, 70, 130, 64, 3), (1, 64, 64, 64, 8),
                                        (3, 65, 520, 128, 2), (4, 16, 72, 8, 5)])
def test_triton_lut_gemv_equals_dense_reference(tk, q, n, k, gs, m):
    mod, dev = tk
    qw, sc, x = _packed(q, n, k, gs, seed=n * k + m)
    x = x[:m]
    y = mod.lut_gemv(x, qw, sc, k, gs, device=dev).cpu()
    ref = lut_gemv_reference(x, qw, sc, k, gs)
    assert y.shape == (m, n)
    assert (y - ref).abs().max() <= 2e-6 * ref.abs().max() * math.sqrt(k / 64) + 1e-7
    # same interface, same numbers as the CPU kernel
    assert torch.allclose(y, lut_gemv(x, qw, sc, k, gs), rtol=1e-5, atol=1e-5)


def test_triton_rejects_batches_above_eight(tk):
    mod, dev = tk
    qw, sc, _ = _packed(1, 8, 16, 8, 0)
    with pytest.raises(ValueError, match="1..8"):
        mod.lut_gemv(torch.randn(9, 16), qw, sc, 16, 8, device=dev)
