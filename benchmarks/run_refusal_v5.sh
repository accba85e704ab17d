#!/usr/bin/env bash
# Refusal v5: the shipped rule with a backing fact (model/refusal.py `backing`): a fact about the entity the
# question names, of the same kind as a neighbour's fact cited above it, backs an answer that names its value
# (v4 refused it by the head check whatever the answer said). The runs of run_refusal_v4.sh (default path,
# 1,000 entries, 200 questions, each with and without its gold fact, REFUSE_BELOW 5.88 as shipped), into their
# own folders.
#   bash benchmarks/run_refusal_v5.sh   -> benchmarks/results/refusal_v5/*.json, *.jsonl, rules.json
#   (WebNLG's answers go to runs/refusal_v5/: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/refusal_v5 PRIVATE=runs/refusal_v5 exec bash benchmarks/run_refusal_v4.sh
