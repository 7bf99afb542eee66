"""One-read per-matrix magnitude pruning (surgeon.kernels.select_band) against a stable-sort oracle."""
from __future__ import annotations

import numpy as np
import pytest
import surgeon.kernels.select_band as band
import torch
from surgeon.kernels.cbuild import cpu_flags
from surgeon.kernels.select import NonFiniteInput

BUILDS = [pytest.param(False, id="portable"),
          pytest.param(True, id="avx512", marks=pytest.mark.skipif("avx512f" not in cpu_flags(),
                                                                   reason="the CPU has no AVX-512"))]


def oracle(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero the k smallest |x|, ties by flat index: a stable sort of |x| (widened to fp32) names them."""
    flat = x.reshape(-1).clone()
    order = torch.sort(flat.float().abs(), stable=True).indices
    flat[order[:k]] = 0
    return flat


def storage(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1).view(torch.int32 if x.dtype == torch.float32 else torch.int16).numpy()


@pytest.fixture(params=BUILDS)
def lib(request, monkeypatch):
    built = band.build(request.param)
    if built is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(band, "_library", lambda: built)
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1 << 16, 300_007])  # 300,007: a tail past the last 16-wide step
@pytest.mark.parametrize("grid", [0, 256])  # 256: weights on a coarse grid, so thousands equal the threshold
def test_one_read_prune_equals_the_stable_sort_oracle(lib, dtype, n, grid):
    g = torch.Generator().manual_seed(n + grid)
    x = torch.randn(n, generator=g)
    if grid:
        x = torch.sign(x) * (torch.floor(x.abs() * grid) + 1) / grid
    x = x.to(dtype)
    for k in (1, n // 10, n // 2, n - 1, n):
        got = band.zero_smallest_k_once(storage(x), str(dtype).removeprefix("torch."), k)
        want = storage(oracle(x, k))
        assert got.dtype.itemsize == want.dtype.itemsize and np.array_equal(got.view(want.dtype), want), k
        assert int((got == 0).sum()) == k  # x holds no zeros


def test_a_missed_bracket_and_an_overflowing_list_give_none(lib, monkeypatch):
    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(band, "bracket_ranks", lambda s, q, z=5.0: (int(q * s) + 50, int(q * s) + 60))
    assert band.zero_smallest_k_once(storage(x), "float32", x.numel() // 2) is None  # the k-th lies below it
    monkeypatch.undo()
    monkeypatch.setattr(band, "_library", lambda: lib)
    monkeypatch.setattr(band, "_ROOM", 0)  # room for 4,096 listed entries; the bracket holds ~3 %
    assert band.zero_smallest_k_once(storage(x), "float32", x.numel() // 2) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("at", [5, (1 << 16) + 3])  # inside the vector loop; in the scalar tail
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused(lib, dtype, at, value):
    x = torch.randn((1 << 16) + 7, generator=torch.Generator().manual_seed(2))
    x[at] = value
    with pytest.raises(NonFiniteInput):
        band.zero_smallest_k_once(storage(x.to(dtype)), str(dtype).removeprefix("torch."), x.numel() // 2)


def test_other_dtypes_and_small_tensors_are_left_to_the_two_pass_route():
    assert band.zero_smallest_k_once(np.zeros(1 << 17, np.float16), "float16", 10) is None
    assert band.zero_smallest_k_once(np.ones(1000, np.float32).view(np.uint32), "float32", 10) is None


def test_the_stratified_sample_draws_one_index_per_stratum():
    at = band.stratified_sample(1_000_003, 4096, 7)
    edges = (np.arange(4097) * 1_000_003) // 4096
    assert at.dtype == np.uint32 and np.all((at >= edges[:-1]) & (at < edges[1:]))
    assert not at.flags.writeable and at is band.stratified_sample(1_000_003, 4096, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_counting_pass_equals_the_numba_bracket_split(lib, dtype):
    """``split_band`` (no output written, keys listed) against ``select.split_bracket`` on the widened bits:
    the same keys in the same order, the same count below, and NaN/Inf counted."""
    from surgeon.kernels.select import fp32_bits, split_bracket

    x = torch.randn(300_007, generator=torch.Generator().manual_seed(3)).to(dtype)
    bits = fp32_bits(x.float())
    for lo, hi in [(0xBF000000 - (1 << 20), 0xBF000000 + (1 << 20)), (0, 0xBE800000), (0xBF800000, 0xFFFFFFFF)]:
        keys, below, bad = band.split_band(storage(x), str(dtype).removeprefix("torch."), lo, hi)
        ref_keys, ref_below, ref_bad = split_bracket(bits, lo, hi, True)
        assert np.array_equal(keys, ref_keys) and below == ref_below and bad == ref_bad == 0
        assert keys.size > 0
    x[7] = float("nan")
    assert band.split_band(storage(x), str(dtype).removeprefix("torch."), 0, 0xFFFFFFFF)[2] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_keys_are_the_keys_of_the_stratified_entries(lib, dtype):
    from surgeon.kernels.select import fp32_bits, keys_of

    x = torch.randn(100_003, generator=torch.Generator().manual_seed(4)).to(dtype)
    got = band.sample_keys(storage(x), str(dtype).removeprefix("torch."), 777, seed=5)
    at = band.stratified_sample(x.numel(), 777, 5)
    assert np.array_equal(got, keys_of(fp32_bits(x.float())[at.astype(np.int64)], True))
    assert not np.array_equal(at, band.stratified_sample(x.numel(), 777, 6))  # the seed draws other entries
