#!/usr/bin/env bash
# HiKVP (pruned) vs flat grounding for the shipped default adapter, as committed in benchmarks/results/.
#   bash benchmarks/run_pruning.sh [QUESTIONS] [ANSWER_QUESTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
Q=${1:-500}
A=${2:-100}
R=benchmarks/results
export HF_HUB_OFFLINE=1
ev() { .venv/bin/atlaskv eval grounding --questions $Q "$@"; }

# 1. search options against each other: the hard set, 10,000 entries, grounding only
P="--set $SHARED/eval/fb15k-para --distractors same-head --sizes 10000 --no-answers"
ev $P --route kbq --json $R/pruning_option_kbq.json
ev $P --route kbq --per-head --json $R/pruning_option_kbq_perhead.json
ev $P --route question --json $R/pruning_option_question.json
ev $P --route both --json $R/pruning_option_both.json
ev $P --route both --per-head --json $R/pruning_option_both_perhead.json

# 2. the default (route both) vs flat on every set; answers for the first $A questions of each pruned point
ev --set $SHARED/eval/fb15k --sizes 1000,10000 --answer-questions $A --json $R/grounding_fb15k_pruned.json
ev --set $SHARED/eval/pararel --sizes 1000,10000 --answer-questions $A --json $R/grounding_pararel_pruned.json
ev --set $SHARED/eval/fb15k-para --distractors same-head --sizes 1000,10000,40844 --answer-questions $A \
  --json $R/grounding_fb15k-para_samehead_pruned.json
ev --set $SHARED/eval/fb15k-para --distractors same-head --sizes 40844 --no-prune --no-answers \
  --json $R/grounding_fb15k-para_samehead_flat_40844.json

# 3. decode steps: reuse the prefill's selection (default) vs search again at every token (the reference)
ev --set $SHARED/eval/fb15k --sizes 1000 --answer-questions $A --questions $A --research \
  --json $R/pruning_option_research.json
ev --set $SHARED/eval/fb15k --sizes 1000 --answer-questions $A --questions $A \
  --json $R/pruning_option_reuse.json
