#!/usr/bin/env bash
# Refusal v6: v5's rule, and a refusal when a fact the KB lacks about the answer's entity draws the question
# LACKING_RATIO times more KB attention than the fact backing the answer (model/probes.py; only relations the
# adapter was trained on are compared). The runs of run_refusal_v4.sh (default path, 1,000 entries, 200
# questions, each with and without its gold fact, as shipped), into their own folders; the saved signals also
# hold the lacking keys over every relation (`lacking_every_relation`), scored in rules.json, and
# benchmarks/lacking_filters.py tries filters on them.
#   bash benchmarks/run_refusal_v6.sh   -> benchmarks/results/refusal_v6/*.json, *.jsonl, rules.json
#   (WebNLG's answers go to runs/refusal_v6/: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/refusal_v6 PRIVATE=runs/refusal_v6 exec bash benchmarks/run_refusal_v4.sh
