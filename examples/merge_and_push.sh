#!/usr/bin/env bash
# TIES-merge two fine-tunes onto their base, then push the Hub-ready folder (dry run unless PUSH=1).
# Usage: examples/merge_and_push.sh BASE FT1 FT2 owner/name
set -euo pipefail
base=${1:?}; a=${2:?}; b=${3:?}; repo=${4:?}
out=$(surgeon merge ties "$a" "$b" --base "$base" --density 0.5 -o merged --force --json -q | jq -r .output)
if [ "${PUSH:-0}" = 1 ]; then surgeon push "$out" "$repo" --private; else surgeon push "$out" "$repo" --dry-run; fi
