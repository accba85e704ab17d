#!/usr/bin/env bash
# HiKVP (pruned) vs flat grounding for the shipped default adapter, as committed in benchmarks/results/.
#   bash benchmarks/run_pruning.sh [QUESTIONS] [ANSWER_QUESTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
Q=${1:-500}
A=${2:-50}
R=benchmarks/results
export HF_HUB_OFFLINE=1
ev() { .venv/bin/atlaskv eval grounding --questions $Q "$@"; }

# 1. the default (route both, top-k 128,64,64) vs flat on every set (ANSWER_QUESTIONS=0: grounding only)
ANS=$([ "$A" = 0 ] && echo --no-answers || echo --answer-questions $A)
ev --set $SHARED/eval/fb15k --sizes 1000,10000 $ANS --json $R/grounding_fb15k_pruned.json
ev --set $SHARED/eval/pararel --sizes 1000,10000 $ANS --json $R/grounding_pararel_pruned.json
ev --set $SHARED/eval/fb15k-para --distractors same-head --sizes 1000,10000,40844 $ANS \
  --json $R/grounding_fb15k-para_samehead_pruned.json
ev --set $SHARED/eval/fb15k-para --distractors same-head --sizes 40844 --no-prune --no-answers \
  --json $R/grounding_fb15k-para_samehead_flat_40844.json

# 2. search options against each other (the hard set, 10,000 entries, the paper's 16 leaves, grounding only);
#    committed in pruning_option_{kbq,kbq_perhead,question,both}.json (100 questions each):
# ev --set $SHARED/eval/fb15k-para --distractors same-head --sizes 10000 --questions 100 --no-answers \
#   --top-k 128,64,16 --route kbq|question|both [--per-head] --json ...

# 3. leaves kept and decode-time search vs answers (fb15k, 1,000 entries, 100 questions), as committed in
#    pruning_answers_fb15k1000_{k16,k64,k16r,flat}.json
# ev --set $SHARED/eval/fb15k --sizes 1000 --questions 100 --answer-questions 100 --top-k 128,64,16 --json ..k16.json
# ev ... --top-k 128,64,64 (k64) ; ev ... --top-k 128,64,16 --research (k16r) ; ev ... --no-prune (flat)
