#!/usr/bin/env bash
# The paper's Figure 6: grounding accuracy vs the top-k kept at each HiKVP level, one level swept at a
# time with the other two at the defaults (128, 64, 64), at 10^5 entries: the whole fb15k-para pool
# (40,844 real facts, same-head distractors first) plus synthetic distractors. Grounding only.
#   bash benchmarks/run_topk_sweep.sh [QUESTIONS]  ->  benchmarks/results/topk_sweep/*.json
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
Q=${1:-200}
OUT=benchmarks/results/topk_sweep
mkdir -p $OUT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ev() { flock /tmp/atlaskv-heavy.lock .venv/bin/atlaskv eval grounding --set $SHARED/eval/fb15k-para \
  --distractors same-head --sizes 100000 --synthetic-fill --questions $Q --no-answers "$@"; }
KR=${KR:-"4 8 16 32"}; KI=${KI:-"8 16 32 128 256"}; KL=${KL:-"4 8 16 32 64 128"}
for k in $KL; do ev --top-k 128,64,$k --json $OUT/leaves_$k.json; done   # leaves_64 = the defaults
for k in $KR; do ev --top-k $k,64,64 --json $OUT/roots_$k.json; done
for k in $KI; do ev --top-k 128,$k,64 --json $OUT/inters_$k.json; done
ev --top-k 128,64,64 --route kbq --json $OUT/kbq_default.json   # the paper's routing alone, for reference
