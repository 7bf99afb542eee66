"""The Python face: the same code path as the CLI and recipes.

    python examples/python_api.py MODEL
"""
import sys

from surgeon.api import run_op, run_recipe

model = sys.argv[1] if len(sys.argv) > 1 else "builtin:smollm2"
pruned = run_op("prune.magnitude", model, output="pruned-py", force=True, sparsity=0.5)
print("pruned:", pruned["output"])
report = run_op("eval", pruned["output"], perplexity="default", seqlen=256, max_windows=4)
print("perplexity:", round(report["results"][0]["perplexity"], 3))
plan = run_recipe({"model": model, "steps": [{"cast": {"dtype": "bfloat16"}}], "output": "bf16-py"}, dry_run=True)
print("dry run of a cast: memory estimate", plan["memory_estimate_bytes"] // 2**20, "MiB")
