"""Which of the entries tied at a sort boundary ``torch.sort`` (CPU, not stable) puts first, without the sort.

TIES trims each task vector to its ``k`` largest magnitudes, and mergekit picks them as
``torch.argsort(|τ|, descending=True)[:k]``. Where the k-th magnitude is shared by several entries, which of them
are kept is decided by the order the sort leaves equal values in. On Linux, torch sorts a CPU tensor with
libstdc++'s ``std::sort`` (introsort) over (value, index) pairs, comparing values only (``KeyValueCompDesc``):
median-of-three pivots moved to the front, unguarded Hoare partitions, a heapsort once the depth limit
``2·⌊log2 n⌋`` is spent, and a final insertion sort over blocks of at most 16. The order among equal values is
therefore a function of the whole array, and no cheaper rule (index order, reverse order) reproduces it.

Only the boundary's side of each partition matters for the set of the first ``k``: a partition never moves an
element across its cut, and the final insertion sort never moves one across a block edge (it is stable, and every
element left of a block compares not-less than every element in it). So the C kernel below runs exactly the
partitions of ``std::sort`` that contain the boundary, like a quickselect, then the block's insertion sort (or the
heapsort, when the depth limit falls on the boundary's range), and marks positions ``[0, k)``: the same set as the
full sort, in O(n) expected time and with 8 bytes per entry (the values it permutes in place and int32 indices)
instead of torch's 12. ``tests/test_tie_order.py`` checks it against ``torch.argsort`` and, for the heap
fallback, against libstdc++'s own ``std::partial_sort``.
"""
from __future__ import annotations

import ctypes

import numpy as np
from surgeon.kernels.cbuild import compiled_library

MAX_ENTRIES = (1 << 31) - 1  # int32 indices

_SOURCE = r"""
#include <stdint.h>

/* torch's KeyValueCompDesc for values without NaN */
static inline int comp(float a, float b) { return a > b; }

static inline void swap_at(float *v, int32_t *ix, int64_t a, int64_t b) {
  float t = v[a]; v[a] = v[b]; v[b] = t;
  int32_t u = ix[a]; ix[a] = ix[b]; ix[b] = u;
}

/* std::__move_median_to_first */
static void median_to_first(float *v, int32_t *ix, int64_t result, int64_t a, int64_t b, int64_t c) {
  if (comp(v[a], v[b])) {
    if (comp(v[b], v[c])) swap_at(v, ix, result, b);
    else if (comp(v[a], v[c])) swap_at(v, ix, result, c);
    else swap_at(v, ix, result, a);
  } else if (comp(v[a], v[c])) swap_at(v, ix, result, a);
  else if (comp(v[b], v[c])) swap_at(v, ix, result, c);
  else swap_at(v, ix, result, b);
}

/* std::__unguarded_partition */
static int64_t unguarded_partition(float *v, int32_t *ix, int64_t first, int64_t last, int64_t pivot) {
  for (;;) {
    while (comp(v[first], v[pivot])) ++first;
    --last;
    while (comp(v[pivot], v[last])) --last;
    if (!(first < last)) return first;
    swap_at(v, ix, first, last);
    ++first;
  }
}

/* std::__push_heap / std::__adjust_heap on the range starting at base */
static void push_heap(float *v, int32_t *ix, int64_t hole, int64_t top, float val, int32_t vi) {
  int64_t parent = (hole - 1) / 2;
  while (hole > top && comp(v[parent], val)) {
    v[hole] = v[parent]; ix[hole] = ix[parent];
    hole = parent;
    parent = (hole - 1) / 2;
  }
  v[hole] = val; ix[hole] = vi;
}

static void adjust_heap(float *v, int32_t *ix, int64_t hole, int64_t len, float val, int32_t vi) {
  const int64_t top = hole;
  int64_t child = hole;
  while (child < (len - 1) / 2) {
    child = 2 * (child + 1);
    if (comp(v[child], v[child - 1])) child--;
    v[hole] = v[child]; ix[hole] = ix[child];
    hole = child;
  }
  if ((len & 1) == 0 && child == (len - 2) / 2) {
    child = 2 * (child + 1);
    v[hole] = v[child - 1]; ix[hole] = ix[child - 1];
    hole = child - 1;
  }
  push_heap(v, ix, hole, top, val, vi);
}

/* std::__partial_sort(first, last, last): make_heap, then sort_heap */
static void heap_sort(float *v, int32_t *ix, int64_t len) {
  if (len >= 2) {
    for (int64_t parent = (len - 2) / 2;; parent--) {
      adjust_heap(v, ix, parent, len, v[parent], ix[parent]);
      if (parent == 0) break;
    }
  }
  for (int64_t last = len; last > 1;) {
    --last;
    float val = v[last]; int32_t vi = ix[last];
    v[last] = v[0]; ix[last] = ix[0];
    adjust_heap(v, ix, 0, last, val, vi);
  }
}

/* mask[i] = 1 for the indices i that std::sort(descending) puts at positions [0, k) of v (permuted in place).
   depth < 0: std::sort's limit 2*floor(log2 n); another value is for tests of the heap fallback. */
void sort_top_k_mask(float *v, int32_t *ix, int64_t n, int64_t k, int64_t depth, uint8_t *mask) {
  for (int64_t i = 0; i < n; i++) ix[i] = (int32_t)i;
  if (depth < 0) {
    depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth++;
    depth *= 2;
  }
  int64_t lo = 0, hi = n;
  int sorted = 0;
  while (hi - lo > 16) {
    if (depth == 0) { heap_sort(v + lo, ix + lo, hi - lo); sorted = 1; break; }
    --depth;
    int64_t mid = lo + (hi - lo) / 2;
    median_to_first(v, ix, lo, lo + 1, mid, hi - 1);
    int64_t cut = unguarded_partition(v, ix, lo + 1, hi, lo);
    if (k == cut) { sorted = 1; break; }
    if (k < cut) hi = cut; else lo = cut;
  }
  if (!sorted) /* the final insertion sort, restricted to the boundary's block */
    for (int64_t i = lo + 1; i < hi; i++) {
      float val = v[i]; int32_t vi = ix[i];
      int64_t j = i;
      while (j > lo && comp(val, v[j - 1])) { v[j] = v[j - 1]; ix[j] = ix[j - 1]; j--; }
      v[j] = val; ix[j] = vi;
    }
  for (int64_t p = 0; p < k; p++) mask[ix[p]] = 1;
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    lib.sort_top_k_mask.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p]
    lib.sort_top_k_mask.restype = None


def _library() -> ctypes.CDLL | None:
    return compiled_library("tie_order", _SOURCE, ["-O2", "-std=c11"], _declare)


def available(n: int) -> bool:
    return 0 < n <= MAX_ENTRIES and _library() is not None


def sort_top_k_mask(values: np.ndarray, k: int, *, depth: int = -1) -> np.ndarray:
    """Boolean mask of the entries at positions ``[0, k)`` of ``std::sort(values, descending)`` over (value,
    index) pairs, i.e. of ``torch.argsort(values, descending=True)[:k]`` on the CPU. ``values``: flat, writable,
    C-contiguous float32 without NaN; it is permuted in place."""
    lib = _library()
    if lib is None or values.dtype != np.float32 or not values.flags.c_contiguous or not values.flags.writeable:
        raise ValueError("sort_top_k_mask needs the compiled kernel and a writable contiguous float32 array")
    n = values.size
    mask = np.zeros(n, dtype=np.bool_)
    index = np.empty(n, dtype=np.int32)
    lib.sort_top_k_mask(values.ctypes.data, index.ctypes.data, n, int(k), int(depth), mask.ctypes.data)
    return mask
