"""Exact k-th value selection (numba radix select on CPU) against torch.kthvalue."""
from __future__ import annotations

import numpy as np
import pytest
import surgeon.kernels.select as select_module
import torch
from surgeon.kernels.select import key_to_float, kth_smallest, smallest_k_mask, zero_smallest_k
from surgeon.kernels.select_global import StreamingKth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("absolute", [False, True])
def test_kth_smallest_equals_torch_kthvalue(dtype, absolute):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, 131, generator=g).to(dtype)
    ref_in = x.float().abs() if absolute else x.float()
    for k in [1, 2, 100, x.numel() // 3, x.numel() // 2, x.numel() - 1, x.numel()]:
        got = kth_smallest(x, k, absolute=absolute)
        ref = torch.kthvalue(ref_in.flatten(), k).values
        assert got.value == float(ref)
        assert got.n_less == int((ref_in < ref).sum())
        assert got.n_equal == int((ref_in == ref).sum())


def test_kth_with_heavy_ties_and_signed_zeros():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0, 2.0, -2.0, 0.0, 3.0, 1.0])
    for k in range(1, x.numel() + 1):
        assert kth_smallest(x, k).value == float(torch.kthvalue(x, k).values)
        assert kth_smallest(x, k, absolute=True).value == float(torch.kthvalue(x.abs(), k).values)


def test_smallest_k_mask_is_exactly_k_with_index_tiebreak():
    x = torch.tensor([[3.0, 1.0, 1.0, 1.0], [2.0, 1.0, 5.0, 1.0]])
    m = smallest_k_mask(x, 3)
    assert int(m.sum()) == 3
    # the four 1.0s tie; the three with the lowest flat index go
    assert m.flatten().tolist() == [False, True, True, True, False, False, False, False]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-3, 4, (64, 48), generator=g).float()  # many ties
    for k in [0, 1, 500, 1536, 3071, 3072]:
        mk = smallest_k_mask(y, k, absolute=True)
        assert int(mk.sum()) == k
        if 0 < k < y.numel():  # everything selected is <= everything not selected
            assert y.abs()[mk].max() <= y.abs()[~mk].min()


def test_zero_smallest_k_matches_reference():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 80, generator=g).bfloat16()
    k = 3840
    got = zero_smallest_k(w, k)
    order = torch.sort(w.float().abs().flatten(), stable=True).indices[:k]
    ref = w.float().flatten().clone()
    ref[order] = 0
    assert torch.equal(got.flatten(), ref)
    assert int((got == 0).sum()) == k


def test_streaming_kth_over_many_tensors_equals_kthvalue_of_concatenation():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(s, generator=g) * sc for s, sc in [(1000, 1.0), (37, 10.0), (4096, 0.01), (5, 1.0)]]
    parts.append(parts[0][:100].clone())  # duplicated values: ties across tensors
    cat = torch.cat(parts).abs()
    for k in [1, 50, 2000, cat.numel() // 2, cat.numel()]:
        s = StreamingKth(k)
        for p in parts:
            s.add_high(p)
        for i, p in enumerate(parts):
            s.add_low(p, i)
        key, n_less, equal = s.result(len(parts))
        ref = torch.kthvalue(cat, k).values
        assert key_to_float(key) == float(ref)
        assert n_less == int((cat < ref).sum())
        assert equal == [int((p.abs() == ref).sum()) for p in parts]


def test_nonfinite_input_is_rejected():
    with pytest.raises(ValueError, match="NaN or Inf"):
        kth_smallest(torch.tensor([1.0, float("nan"), 2.0]), 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kth_smallest(torch.tensor([1.0, -float("inf"), 2.0]), 1)


def test_float64_falls_back_to_torch():
    x = torch.randn(100, dtype=torch.float64)
    assert kth_smallest(x, 10).value == float(torch.kthvalue(x, 10).values)
    assert int(smallest_k_mask(x, 10).sum()) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_equals_cpu():
    x = torch.randn(1000, 500)
    for k in [1, 250000, 500000]:
        assert kth_smallest(x, k, device="cuda").value == kth_smallest(x, k).value
        assert torch.equal(smallest_k_mask(x, k, device="cuda", absolute=True).cpu(),
                           smallest_k_mask(x, k, absolute=True))


def test_zero_smallest_k_with_heavy_ties_matches_stable_sort_reference():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(-3, 4, (33, 70), generator=g).float() * 0.25
    for k in [1, 100, 1155, 2000, 2309]:
        order = torch.sort(y.abs().flatten(), stable=True).indices[:k]
        ref = y.flatten().clone()
        ref[order] = 0
        assert torch.equal(zero_smallest_k(y, k).flatten(), ref), k


# --- sampled bracket (tensors of >= BRACKET_MIN entries) ---------------------------------------------------------

def _stable_sort_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Oracle: zero the k smallest |x| found by a stable full sort (ties: lower flat index first)."""
    order = torch.sort(x.float().abs().flatten(), stable=True).indices[:k]
    ref = x.float().flatten().clone()
    ref[order] = 0
    return ref


def _radix_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The previous kernel: exact two-pass radix select of the k-th key, then zero below it."""
    from surgeon.kernels.select import fp32_bits, zero_below

    bits = fp32_bits(x)
    kth = _RADIX(bits, k, True)
    return zero_below(bits, kth.key, k - kth.n_less, absolute=True)


_RADIX = select_module._kth_of_bits


def _big_inputs():
    g = torch.Generator().manual_seed(5)
    yield "fp32", torch.randn(300, 700, generator=g)
    yield "bf16 (many ties)", torch.randn(257, 1031, generator=g).bfloat16()
    yield "integers (heavy ties)", torch.randint(-4, 5, (512, 300), generator=g).float() * 0.5
    yield "rows of different scale", torch.randn(400, 400, generator=g) * torch.logspace(-3, 2, 400)[:, None]
    yield "signed zeros", torch.where(torch.rand(300, 300, generator=g) < 0.6, torch.zeros(()), -torch.zeros(()))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("name,x", list(_big_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bracket_path_equals_stable_sort_and_the_radix_kernel(name, x, parallel, monkeypatch):
    from surgeon.kernels import select

    if parallel:  # tensors this size run on the calling thread; force the multi-part (parallel) kernels
        monkeypatch.setattr(select, "SERIAL_MAX", 1 << 14)
    assert x.numel() >= select.BRACKET_MIN
    n = x.numel()
    radix = []
    monkeypatch.setattr(select, "_kth_of_bits", lambda *a: radix.append(a) or _RADIX(*a))
    for k in [1, 7, n // 10, n // 2, n // 2 + 1, (9 * n) // 10, n - 1, n]:
        got = zero_smallest_k(x, k).flatten()
        assert not radix, (name, k)  # the sampled bracket held the k-th value (no fallback)
        ref = _stable_sort_reference(x, k)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (name, k)  # bitwise: -0.0 kept
        assert torch.equal(got.view(torch.int32), _radix_reference(x, k).view(torch.int32)), (name, k)


def test_bracket_miss_falls_back_to_the_exact_select(monkeypatch):
    from surgeon.kernels import select

    x = torch.randn(300, 300, generator=torch.Generator().manual_seed(6))
    k = x.numel() // 2
    calls = []

    def wrong(sample, q, z=select.BRACKET_Z):  # a bracket far above the median: the count check must miss
        calls.append(q)
        return int(np.sort(sample)[-5]), int(np.sort(sample)[-1])

    monkeypatch.setattr(select, "bracket", wrong)
    assert torch.equal(zero_smallest_k(x, k).flatten(), _stable_sort_reference(x, k))
    assert calls  # the bracket path ran (and missed) before the fallback


def test_bracket_path_refuses_nan_and_inf():
    for bad in [float("nan"), float("inf"), -float("inf")]:
        x = torch.randn(300, 300)
        x[123, 45] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            zero_smallest_k(x, 1000)


def test_bracket_kth_over_many_tensors_equals_kthvalue_of_concatenation():
    from surgeon.kernels.select import bracket
    from surgeon.kernels.select_global import BracketKth, sample_tensor

    g = torch.Generator().manual_seed(7)
    parts = [torch.randn(s, generator=g) * sc for s, sc in [(20000, 1.0), (370, 10.0), (40960, 0.01), (5, 1.0)]]
    parts.append(parts[0][:1000].clone().bfloat16())  # ties across tensors, another dtype
    cat = torch.cat([p.float() for p in parts]).abs()
    n = cat.numel()
    for k in [1, 50, n // 3, n // 2, n - 1, n]:
        sample = np.concatenate([sample_tensor(p, max(16, 4096 * p.numel() // n), seed=i) for i, p in enumerate(parts)])
        acc = BracketKth(k, *bracket(sample, k / n))
        for i, p in enumerate(parts):
            acc.add(p, i)
        key, n_less, equal = acc.result(len(parts))
        ref = torch.kthvalue(cat, k).values
        assert key_to_float(key) == float(ref), k
        assert n_less == int((cat < ref).sum())
        assert equal == [int((p.float().abs() == ref).sum()) for p in parts]
    miss = BracketKth(n // 2, 0, 1)  # a bracket holding nothing: the result says so
    for i, p in enumerate(parts):
        miss.add(p, i)
    assert miss.result(len(parts)) is None
