#!/usr/bin/env bash
# The refusal rule on the default path (HiKVP pruned, value decoding on), issue 22 item 4: each question asked with
# its fact present and removed live from the KB; thresholds calibrated on separate questions (at most 3 % of
# answerable questions refused), applied unchanged to the test questions. fb15k, KB of 100 / 1,000 / 5,887.
#   bash benchmarks/run_refusal.sh   -> benchmarks/results/refusal/*.json, *.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
S=${ATLASKV_SHARED:-../shared}/eval
OUT=benchmarks/results/refusal
mkdir -p $OUT
.venv/bin/python benchmarks/eval_refusal.py --set $S/fb15k --questions 200 --calibration 100 --sizes 1000,all \
  --prune --kb-dir build/refusal_kb --json $OUT/fb15k_pruned.json --details $OUT/fb15k_pruned.jsonl
.venv/bin/python benchmarks/eval_refusal.py --set $S/fb15k --questions 60 --calibration 40 --sizes 100 \
  --prune --kb-dir build/refusal_kb --json $OUT/fb15k_pruned_100.json --details $OUT/fb15k_pruned_100.jsonl
