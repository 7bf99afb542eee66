#!/usr/bin/env bash
# GPU check (issue 11): on a CUDA machine, install what is missing, run the `gpu`-marked tests, then print and
# write a summary table: Triton LUT GEMV vs cuBLAS fp16 GEMV at batch 1 (4096², 8192²; 2 and 3 bits), CPU vs
# CUDA times of the heavy operations on SmolLM2-sized work, and peak GPU memory.
#
#   benchmarks/gpu_check.sh RESULTS_FILE        (ends within ~7.5 minutes; exit 0 only if the gpu tests pass)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Installs are best effort (an offline machine uses what
# it has): surgeon itself editable without dependencies, triton if missing.
set -u
RESULTS="${1:?usage: benchmarks/gpu_check.sh RESULTS_FILE}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
TOTAL=450  # seconds for everything after this line
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "== python: $PY"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "torch missing: installing (needs network)"; timeout 150 "$PY" -m pip install -q torch || true
fi
if ! "$PY" -c "import surgeon.kernels.shiftadd" 2>/dev/null; then
  timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . || true
  for mod in safetensors transformers pydantic numba accelerate pytest yaml; do
    "$PY" -c "import $mod" 2>/dev/null || timeout 60 "$PY" -m pip install -q "$mod" 2>/dev/null || \
      { [ "$mod" = yaml ] && timeout 60 "$PY" -m pip install -q pyyaml; } || true
  done
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "triton missing: installing"; timeout 90 "$PY" -m pip install -q "triton>=3.0" || true
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch: nothing to check" | tee "$RESULTS"
  exit 1
fi

echo "== gpu tests"
PYTEST_LOG="$(mktemp)"
timeout $(( $(left) / 2 )) "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$PYTEST_LOG" 2>&1
PYTEST_RC=$?
tail -n 30 "$PYTEST_LOG"

echo "== benchmarks ($(left) s left)"
timeout $(( $(left) > 30 ? $(left) : 30 )) "$PY" - "$RESULTS" "$PYTEST_RC" "$(tail -n 1 "$PYTEST_LOG")" <<'PYEOF'
import statistics, sys, time

import torch

results_path, pytest_rc, pytest_summary = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines: list[str] = []


def out(s: str = "") -> None:
    print(s, flush=True)
    lines.append(s)
    with open(results_path, "w") as fh:  # rewritten each line: a timeout still leaves a partial table
        fh.write("\n".join(lines) + "\n")


def cuda_time(fn, repeat=50, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def cpu_time(fn, repeat=3, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
dev = torch.cuda.get_device_name(0)
out(f"device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {tv}; "
    f"{torch.get_num_threads()} CPU threads")
out(f"gpu tests: {'PASS' if pytest_rc == 0 else 'FAIL (rc %d)' % pytest_rc} — {pytest_summary}")
torch.cuda.reset_peak_memory_stats()

# copy bandwidth on the device (read + write)
buf = torch.empty(512 << 20, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(buf)
bw = 2 * buf.numel() / cuda_time(lambda: dst.copy_(buf), repeat=10)
del buf, dst
out(f"device copy bandwidth: {bw / 1e12:.2f} TB/s")
out()
out("Triton LUT GEMV vs cuBLAS fp16 GEMV, batch 1 (goal >= 2x at 3 bits)")
out(f"{'shape':<12}{'bits':>5}{'LUT us':>10}{'fp16 us':>10}{'speedup':>9}{'LUT % of bound':>16}{'max rel err':>13}")
from surgeon.kernels.shiftadd import PackedLinear
for n in (4096, 8192):
    k = n
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
    x16 = torch.randn(1, k, device="cuda", dtype=torch.float16)
    t16 = cuda_time(lambda: torch.nn.functional.linear(x16, w16))
    del w16
    for q in (2, 3):
        qw = torch.randint(0, 256, (q, n, k // 8), dtype=torch.uint8)
        sc = torch.randn(q, n, k // 128) * 0.01
        lin = PackedLinear(qw, sc, k, 128)
        x = x16.float()
        try:
            tl_ = cuda_time(lambda: lin.matmul(x))
            kern = lin.last_kernel
            ref = x @ lin.dense("cuda").T
            err = float((lin.matmul(x) - ref).abs().max() / ref.abs().max())
            bound = (qw.numel() + sc.numel() * 2) / bw
            out(f"{n}x{k:<7}{q:>5}{tl_ * 1e6:>10.1f}{t16 * 1e6:>10.1f}{t16 / tl_:>8.2f}x{100 * bound / tl_:>15.1f}%"
                f"{err:>13.1e}  [{kern}]")
        except Exception as e:  # noqa: BLE001 - report and go on
            out(f"{n}x{k:<7}{q:>5}  failed: {type(e).__name__}: {e}"[:200])
out()
out("CPU vs CUDA, SmolLM2-sized work (seconds; median of 3)")
out(f"{'operation':<46}{'CPU s':>10}{'CUDA s':>10}{'speedup':>9}")


def row(name, fn_cpu, fn_cuda):
    try:
        c = cpu_time(fn_cpu)
        torch.cuda.synchronize()
        g = cpu_time(lambda: (fn_cuda(), torch.cuda.synchronize()))
        out(f"{name:<46}{c:>10.4f}{g:>10.4f}{c / g:>8.1f}x")
    except Exception as e:  # noqa: BLE001
        out(f"{name:<46}  failed: {type(e).__name__}: {e}"[:200])


from surgeon.kernels import linalg
a = torch.randn(1536, 576)
row("svd 1536x576 (fp32)", lambda: linalg.svd(a), lambda: linalg.svd(a, device="cuda"))
big = torch.randn(8192, 4096)
row("randomized_svd 8192x4096 rank 64", lambda: linalg.randomized_svd(big, 64),
    lambda: linalg.randomized_svd(big, 64, device="cuda"))
m = torch.randn(1536, 1536, dtype=torch.float64); spd = m @ m.T + 1536 * torch.eye(1536, dtype=torch.float64)
rhs = torch.randn(1536, 576, dtype=torch.float64)
row("cholesky_solve 1536 (fp64, 576 rhs)", lambda: linalg.cholesky_solve(spd, rhs),
    lambda: linalg.cholesky_solve(spd, rhs, device="cuda"))
acts = torch.randn(32 * 256, 1536)


def cov(device):
    acc = linalg.CovarianceAccumulator(1536, device=device)
    for i in range(0, acts.shape[0], 1024):
        acc.update(acts[i:i + 1024])
    return acc.mean()


row("covariance 8192 tokens x 1536 (fp64)", lambda: cov("cpu"), lambda: cov("cuda"))
try:
    from surgeon.kernels.select import kth_smallest
    vals = torch.randn(30 * 1536 * 576 // 4)
    row("k-th value of 6.6M weights", lambda: kth_smallest(vals, vals.numel() // 2),
        lambda: kth_smallest(vals, vals.numel() // 2, device="cuda"))
except ImportError:
    out("k-th value: surgeon.kernels.select not available")
from surgeon.ops.shiftadd.bcq import quantize_weight_only
from surgeon.ops.shiftadd.gptq import quantize_gptq
w = torch.randn(1536, 576) * 0.05
xx = torch.randn(4096, 576) * torch.exp(torch.randn(576))
h = xx.T @ xx / xx.shape[0]
row("ShiftAdd GPTQ-BCQ loop 1536x576, 3 bit", lambda: quantize_gptq(w, h, 3, 128, rounds=5),
    lambda: quantize_gptq(w, h, 3, 128, rounds=5, device="cuda"))
row("ShiftAdd weight-only BCQ 1536x576, 3 bit", lambda: quantize_weight_only(w, 3, 128),
    lambda: quantize_weight_only(w, 3, 128, device="cuda"))
out()
out(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PYEOF
BENCH_RC=$?
echo "== results written to $RESULTS (tests rc $PYTEST_RC, bench rc $BENCH_RC, $(( $(date +%s) - START )) s)"
exit $PYTEST_RC
