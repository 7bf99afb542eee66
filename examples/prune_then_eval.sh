#!/usr/bin/env bash
# Shell pipeline: prune a model, take the output path from --json, evaluate it, print perplexity.
# Usage: examples/prune_then_eval.sh MODEL [SPARSITY]
set -euo pipefail
model=${1:?usage: $0 MODEL [SPARSITY]}
sparsity=${2:-0.5}
out=$(surgeon prune magnitude "$model" --sparsity "$sparsity" -o "pruned-$sparsity" --force --json -q | jq -r .output)
surgeon eval "$out" --perplexity default --seqlen 256 --max-windows 8 --json -q | jq '.results[0].perplexity'
