"""The boundary-only port of std::sort picks the same first k as torch's CPU sort, and its heap fallback the same
as libstdc++'s own heap sort, whether it follows every entry (an index) or only the tied ones (a map)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from surgeon.kernels import tie_order

pytestmark = pytest.mark.skipif(not tie_order.available(1), reason="no C compiler for the kernel")


def argsort_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Oracle: mergekit's call, torch.argsort(|τ|, descending=True)[:k], as a mask."""
    mask = np.zeros(values.size, dtype=bool)
    mask[torch.argsort(torch.from_numpy(values.copy()), descending=True)[:k].numpy()] = True
    return mask


@pytest.mark.parametrize("track", [None, True, False])
@pytest.mark.parametrize("levels", [1, 2, 3, 17, 4096, 1 << 24])
def test_first_k_equal_torch_argsort_on_tie_heavy_arrays(levels, track):
    """Both ways of following identities (a map of the tied entries' positions, an index of every entry)."""
    rng = np.random.default_rng(levels)
    cases = 0
    for n in [*range(1, 40), 100, 1001, 65537, 300_007]:
        values = rng.integers(0, levels, size=n).astype(np.float32) / 8
        for k in sorted({1, n // 2, max(1, n - 1), n, int(rng.integers(1, n + 1))}):
            got = tie_order.sort_top_k_mask(values.copy(), k, track=track)
            assert np.array_equal(got, argsort_mask(values, k)), (n, levels, k, track)
            cases += 1
    assert cases > 150


def test_first_k_equal_torch_argsort_on_a_task_vector_sized_array():
    """28 M |τ| values quantised to 1/4096 (thousands of ties at the threshold: the map of tied positions)."""
    rng = np.random.default_rng(0)
    values = (np.abs(rng.normal(size=28_311_552)) * 4096).round().astype(np.float32) / 4096
    k = values.size // 2
    assert np.count_nonzero(values == tie_order._kth_largest(values, k)) <= tie_order.TRACK_FRACTION * values.size
    assert np.array_equal(tie_order.sort_top_k_mask(values.copy(), k), argsort_mask(values, k))


_ORACLE = r"""
#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>
// reads n, depth, then n floats; prints the indices in the order libstdc++'s introsort (with the given depth
// limit; -1: std::sort itself) leaves (value, index) pairs, comparing values only, descending
int main() {
  long n, depth; if (std::scanf("%ld %ld", &n, &depth) != 2) return 1;
  std::vector<std::pair<float, int>> a(n);
  for (long i = 0; i < n; i++) { if (std::scanf("%f", &a[i].first) != 1) return 1; a[i].second = (int)i; }
  auto comp = [](const std::pair<float, int>& x, const std::pair<float, int>& y) { return x.first > y.first; };
  if (depth < 0) std::sort(a.begin(), a.end(), comp);
  else if (n > 1) {
    std::__introsort_loop(a.begin(), a.end(), depth, __gnu_cxx::__ops::__iter_comp_iter(comp));
    std::__final_insertion_sort(a.begin(), a.end(), __gnu_cxx::__ops::__iter_comp_iter(comp));
  }
  for (long i = 0; i < n; i++) std::printf("%d\n", a[i].second);
  return 0;
}
"""


@pytest.fixture(scope="module")
def libstdcxx_oracle(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ for the libstdc++ oracle")
    folder = tmp_path_factory.mktemp("oracle")
    (folder / "oracle.cc").write_text(_ORACLE)
    r = subprocess.run([cxx, "-O1", "-std=c++17", str(folder / "oracle.cc"), "-o", str(folder / "oracle")],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"the oracle needs libstdc++'s internal introsort: {r.stderr[-300:]}")

    def run(values: np.ndarray, depth: int) -> np.ndarray:
        text = f"{values.size} {depth}\n" + "\n".join(repr(float(v)) for v in values)
        out = subprocess.run([str(folder / "oracle")], input=text, capture_output=True, text=True, check=True)
        return np.array(out.stdout.split(), dtype=np.int64)

    return run


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("depth", [0, 1, 2, 5, -1])
def test_heap_fallback_and_depth_limits_equal_libstdcxx(libstdcxx_oracle, depth, track):
    rng = np.random.default_rng(depth + 10)
    for n in (2, 15, 16, 17, 33, 200, 2049):
        for levels in (2, 5, 1000):
            values = rng.integers(0, levels, size=n).astype(np.float32)
            order = libstdcxx_oracle(values, depth)
            for k in sorted({1, n // 3, n // 2, n - 1}):
                if k < 1:
                    continue
                want = np.zeros(n, dtype=bool)
                want[order[:k]] = True
                got = tie_order.sort_top_k_mask(values.copy(), k, depth=depth, track=track)
                assert np.array_equal(got, want), (n, levels, k, depth, track)
