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
full sort, in O(n) expected time. Only the entries equal to the k-th value (found first by two histograms) can be
chosen either way, so only their identities are followed, in a map of their positions, when they are few; else
an int32 index per entry. Memory: the values it permutes in place (4 bytes per entry) and the mask, plus the
index (4 more) only for tie-heavy tensors, against torch's 12 bytes per entry. ``tests/test_tie_order.py`` checks it against ``torch.argsort`` and, for the heap
fallback, against libstdc++'s own ``std::partial_sort``.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from surgeon.kernels.cbuild import compiled_library

MAX_ENTRIES = (1 << 31) - 1  # int32 indices

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* torch's KeyValueCompDesc for values without NaN */
static inline int comp(float a, float b) { return a > b; }

/* Which original entry sits where: either an int32 index per position (ix), or, when few entries equal the k-th
   value vk (the only ones whose order decides anything), a map position -> tag of just those entries. The map
   is insert-or-update only: a position holds a tracked entry exactly when its value equals vk, so stale keys of
   positions that no longer do are never read. */
typedef struct {
  float *v;
  int32_t *ix;      /* index mode */
  float vk;         /* map mode */
  int64_t *keys;
  int32_t *tags;
  uint64_t cap, used;
  int failed;
} track;

static inline uint64_t mix(uint64_t x) { x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; return x; }

static void map_put(track *t, int64_t key, int32_t tag);

static void map_grow(track *t) {
  uint64_t old_cap = t->cap;
  int64_t *old_keys = t->keys;
  int32_t *old_tags = t->tags;
  int64_t *keys = malloc(sizeof(int64_t) * old_cap * 2);
  int32_t *tags = malloc(sizeof(int32_t) * old_cap * 2);
  if (!keys || !tags) { free(keys); free(tags); t->failed = 1; return; }
  for (uint64_t i = 0; i < old_cap * 2; i++) keys[i] = -1;
  t->keys = keys; t->tags = tags; t->cap = old_cap * 2; t->used = 0;
  for (uint64_t i = 0; i < old_cap; i++)
    if (old_keys[i] >= 0) map_put(t, old_keys[i], old_tags[i]);
  free(old_keys); free(old_tags);
}

static void map_put(track *t, int64_t key, int32_t tag) {
  if (t->failed) return;
  if (2 * (t->used + 1) > t->cap) { map_grow(t); if (t->failed) return; }
  uint64_t i = mix((uint64_t)key) & (t->cap - 1);
  while (t->keys[i] >= 0 && t->keys[i] != key) i = (i + 1) & (t->cap - 1);
  if (t->keys[i] < 0) { t->keys[i] = key; t->used++; }
  t->tags[i] = tag;
}

static int32_t map_get(const track *t, int64_t key) {
  uint64_t i = mix((uint64_t)key) & (t->cap - 1);
  while (t->keys[i] != key) { if (t->keys[i] < 0) return -1; i = (i + 1) & (t->cap - 1); }
  return t->tags[i];
}

/* the identity of the entry at p (-1: untracked) */
static inline int32_t tag_at(const track *t, int64_t p) {
  if (t->ix) return t->ix[p];
  return t->v[p] == t->vk ? map_get(t, p) : -1;
}

static inline void put(track *t, int64_t p, float val, int32_t tag) {
  t->v[p] = val;
  if (t->ix) t->ix[p] = tag;
  else if (tag >= 0) map_put(t, p, tag);
}

static inline void swap_at(track *t, int64_t a, int64_t b) {
  float va = t->v[a], vb = t->v[b];
  int32_t ta = tag_at(t, a), tb = tag_at(t, b);
  put(t, a, vb, tb);
  put(t, b, va, ta);
}

static inline void move_to(track *t, int64_t dst, int64_t src) { put(t, dst, t->v[src], tag_at(t, src)); }

/* std::__move_median_to_first */
static void median_to_first(track *t, int64_t result, int64_t a, int64_t b, int64_t c) {
  const float *v = t->v;
  if (comp(v[a], v[b])) {
    if (comp(v[b], v[c])) swap_at(t, result, b);
    else if (comp(v[a], v[c])) swap_at(t, result, c);
    else swap_at(t, result, a);
  } else if (comp(v[a], v[c])) swap_at(t, result, a);
  else if (comp(v[b], v[c])) swap_at(t, result, c);
  else swap_at(t, result, b);
}

/* std::__unguarded_partition */
static int64_t unguarded_partition(track *t, int64_t first, int64_t last, int64_t pivot) {
  for (;;) {
    while (comp(t->v[first], t->v[pivot])) ++first;
    --last;
    while (comp(t->v[pivot], t->v[last])) --last;
    if (!(first < last)) return first;
    swap_at(t, first, last);
    ++first;
  }
}

/* std::__push_heap / std::__adjust_heap over the range starting at base */
static void push_heap(track *t, int64_t base, int64_t hole, int64_t top, float val, int32_t tag) {
  int64_t parent = (hole - 1) / 2;
  while (hole > top && comp(t->v[base + parent], val)) {
    move_to(t, base + hole, base + parent);
    hole = parent;
    parent = (hole - 1) / 2;
  }
  put(t, base + hole, val, tag);
}

static void adjust_heap(track *t, int64_t base, int64_t hole, int64_t len, float val, int32_t tag) {
  const int64_t top = hole;
  int64_t child = hole;
  while (child < (len - 1) / 2) {
    child = 2 * (child + 1);
    if (comp(t->v[base + child], t->v[base + child - 1])) child--;
    move_to(t, base + hole, base + child);
    hole = child;
  }
  if ((len & 1) == 0 && child == (len - 2) / 2) {
    child = 2 * (child + 1);
    move_to(t, base + hole, base + child - 1);
    hole = child - 1;
  }
  push_heap(t, base, hole, top, val, tag);
}

/* std::__partial_sort(first, last, last): make_heap, then sort_heap */
static void heap_sort(track *t, int64_t base, int64_t len) {
  if (len >= 2) {
    for (int64_t parent = (len - 2) / 2;; parent--) {
      adjust_heap(t, base, parent, len, t->v[base + parent], tag_at(t, base + parent));
      if (parent == 0) break;
    }
  }
  for (int64_t last = len; last > 1;) {
    --last;
    float val = t->v[base + last];
    int32_t tag = tag_at(t, base + last);
    move_to(t, base + last, base);
    adjust_heap(t, base, 0, last, val, tag);
  }
}

/* The partitions of std::sort(descending) that hold position k, then that block's final insertion sort. */
static void first_k(track *t, int64_t n, int64_t k, int64_t depth) {
  if (depth < 0) {
    depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth++;
    depth *= 2;
  }
  int64_t lo = 0, hi = n;
  while (hi - lo > 16) {
    if (depth == 0) { heap_sort(t, lo, hi - lo); return; }
    --depth;
    int64_t mid = lo + (hi - lo) / 2;
    median_to_first(t, lo, lo + 1, mid, hi - 1);
    int64_t cut = unguarded_partition(t, lo + 1, hi, lo);
    if (k == cut) return;
    if (k < cut) hi = cut; else lo = cut;
  }
  for (int64_t i = lo + 1; i < hi; i++) {
    float val = t->v[i];
    int32_t tag = tag_at(t, i);
    int64_t j = i;
    while (j > lo && comp(val, t->v[j - 1])) { move_to(t, j, j - 1); j--; }
    put(t, j, val, tag);
  }
}

/* Index mode: mask[i] = 1 for the indices i that std::sort(descending) puts at positions [0, k) of v. */
void sort_top_k_mask(float *v, int32_t *ix, int64_t n, int64_t k, int64_t depth, uint8_t *mask) {
  track t = {v, ix, 0.0f, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; i++) ix[i] = (int32_t)i;
  first_k(&t, n, k, depth);
  for (int64_t p = 0; p < k; p++) mask[ix[p]] = 1;
}

/* Map mode: the same set when vk is the k-th largest value: mask must hold v > vk already (the caller's pass),
   tied lists the m flat indices of the entries equal to vk in order. Returns 0, or -1 when memory ran out. */
int sort_top_k_mask_tracked(float *v, int64_t n, int64_t k, int64_t depth, float vk, const int64_t *tied,
                            int64_t m, uint8_t *mask) {
  track t = {v, 0, vk, 0, 0, 16, 0, 0};
  while (t.cap < 4 * (uint64_t)m) t.cap *= 2;
  t.keys = malloc(sizeof(int64_t) * t.cap);
  t.tags = malloc(sizeof(int32_t) * t.cap);
  if (!t.keys || !t.tags) { free(t.keys); free(t.tags); return -1; }
  for (uint64_t i = 0; i < t.cap; i++) t.keys[i] = -1;
  for (int64_t j = 0; j < m; j++) map_put(&t, tied[j], (int32_t)j);
  first_k(&t, n, k, depth);
  int failed = t.failed;
  if (!failed)
    for (int64_t p = 0; p < k; p++)
      if (v[p] == vk) {
        int32_t tag = map_get(&t, p);
        if (tag < 0) { failed = 1; break; }
        mask[tied[tag]] = 1;
      }
  free(t.keys); free(t.tags);
  return failed ? -1 : 0;
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sort_top_k_mask.argtypes = [ptr, ptr, i64, i64, i64, ptr]
    lib.sort_top_k_mask.restype = None
    lib.sort_top_k_mask_tracked.argtypes = [ptr, i64, i64, i64, ctypes.c_float, ptr, i64, ptr]
    lib.sort_top_k_mask_tracked.restype = ctypes.c_int


@functools.cache
def _library() -> ctypes.CDLL | None:
    return compiled_library("tie_order", _SOURCE, ["-O2", "-std=c11"], _declare)


def available(n: int) -> bool:
    return 0 < n <= MAX_ENTRIES and _library() is not None


#: track the tied entries alone (a map of their positions) when they are at most this fraction of the tensor;
#: beyond it an int32 index per entry is smaller and faster
TRACK_FRACTION = 1 / 64


def sort_top_k_mask(values: np.ndarray, k: int, *, depth: int = -1, track: bool | None = None,
                    kth: float | None = None) -> np.ndarray:
    """Boolean mask of the entries at positions ``[0, k)`` of ``std::sort(values, descending)`` over (value,
    index) pairs, i.e. of ``torch.argsort(values, descending=True)[:k]`` on the CPU. ``values``: flat, writable,
    C-contiguous float32 without NaN; it is permuted in place. ``track``: None decides by the count of tied
    entries; True/False force the map or the index (tests); values with a sign bit set always use the index.

    Only the entries equal to the k-th largest value need their identity followed: when they are few
    (``track``; default: at most :data:`TRACK_FRACTION` of the entries), a map of their positions replaces the
    int32 index of every entry (4 bytes per entry less). ``kth``: the k-th largest value when the caller
    already has it (found here otherwise)."""
    lib = _library()
    if lib is None or values.dtype != np.float32 or not values.flags.c_contiguous or not values.flags.writeable:
        raise ValueError("sort_top_k_mask needs the compiled kernel and a writable contiguous float32 array")
    n = values.size
    k = int(k)
    if track is not False and 0 < k < n and not np.signbit(values).any():
        vk = _kth_largest(values, k) if kth is None else np.float32(kth)
        mask = values > vk
        tied = np.flatnonzero(values == vk)
        need = k - int(np.count_nonzero(mask))
        if need == tied.size:
            mask[tied] = True
            return mask
        if track or tied.size <= TRACK_FRACTION * n:
            if lib.sort_top_k_mask_tracked(values.ctypes.data, n, k, int(depth), float(vk), tied.ctypes.data,
                                           tied.size, mask.ctypes.data) == 0:
                return mask
            raise MemoryError("sort_top_k_mask: no memory for the map of tied positions")
    mask = np.zeros(n, dtype=np.bool_)
    index = np.empty(n, dtype=np.int32)
    lib.sort_top_k_mask(values.ctypes.data, index.ctypes.data, n, k, int(depth), mask.ctypes.data)
    return mask


def _kth_largest(values: np.ndarray, k: int) -> np.float32:
    """The k-th largest of non-negative float32 ``values`` without reordering them: two 65,536-bin histograms of
    the bit patterns (their order is the values' order for non-negative floats), in blocks of 1 M entries.
    :func:`surgeon.kernels.select.kth_smallest` is the same radix select in numba, on torch tensors; this numpy
    one keeps torch-free merges from importing numba (0.4 s and 90 MiB)."""
    bits = values.view(np.uint32)
    block = 1 << 20
    high = np.zeros(1 << 16, dtype=np.int64)
    for lo in range(0, bits.size, block):
        high += np.bincount(bits[lo:lo + block] >> 16, minlength=1 << 16)
    rank = values.size - k  # 0-based rank from the smallest
    cum = np.cumsum(high)
    b = int(np.searchsorted(cum, rank, side="right"))
    below = int(cum[b - 1]) if b else 0
    low = np.zeros(1 << 16, dtype=np.int64)
    for lo in range(0, bits.size, block):
        chunk = bits[lo:lo + block]
        low += np.bincount(chunk[(chunk >> 16) == b] & 0xFFFF, minlength=1 << 16)
    rest = int(np.searchsorted(np.cumsum(low), rank - below, side="right"))
    return np.array([(b << 16) | rest], dtype=np.uint32).view(np.float32)[0]
