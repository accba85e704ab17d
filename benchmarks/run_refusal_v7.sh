#!/usr/bin/env bash
# Refusal v7: v6's lacking-key check compares only relations an entity holding the answer's facts may hold
# (relation_pairs.tsv in the adapter folder: two relations sharing a head in at least LACKING_KIND_SHARE of the
# training heads holding one), and LACKING_RATIO is recalibrated on the dev sets' answers of this code
# (refusal_rules.py, "v5 or lacking key"). The runs of run_refusal_v4.sh into their own folders.
#   bash benchmarks/run_refusal_v7.sh   -> benchmarks/results/refusal_v7/*.json, *.jsonl, rules.json
#   (WebNLG's answers go to runs/refusal_v7/: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/refusal_v7 PRIVATE=runs/refusal_v7 exec bash benchmarks/run_refusal_v4.sh
