#!/usr/bin/env bash
# answer_exact (what the user reads) beside answer_em, for the shipped adapter and RAG with the same model:
# KB of 100, 100 questions, all answered, seed 0; the three sets (fb15k-para with same-head distractors).
#   bash benchmarks/run_answer_exact.sh   -> benchmarks/results/answer_exact/*.json, *.jsonl (every answer)
# (the dev-set run at the end needs `python benchmarks/make_dev_set.py runs/dev/fb15k-train 2000` first)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${ATLASKV_SHARED:-../shared}/eval
OUT=benchmarks/results/answer_exact
mkdir -p $OUT
for set in fb15k pararel fb15k-para; do
  d=random; [ $set = fb15k-para ] && d=same-head
  for mode in flat pruned; do
    flag=--no-prune; [ $mode = pruned ] && flag=--prune
    .venv/bin/atlaskv eval grounding --set $S/$set --sizes 100 --questions 100 --answer-questions 100 \
      --distractors $d $flag --refuse-below 3.23 --json $OUT/atlaskv_${set}_100_$mode.json \
      --save-answers $OUT/atlaskv_${set}_100_$mode.jsonl
  done
  .venv/bin/atlaskv eval grounding --set $S/$set --sizes 100 --questions 100 --answer-questions 100 \
    --distractors $d --method rag --json $OUT/rag_${set}_100.json
done
# the dev set of training facts (benchmarks/make_dev_set.py), where settings that change answers are picked
if [ -d runs/dev/fb15k-train ]; then
  .venv/bin/atlaskv eval grounding --set runs/dev/fb15k-train --sizes 100 --questions 200 --answer-questions 200 \
    --prune --refuse-below 3.23 --json $OUT/dev_fb15k-train_100_pruned.json --save-answers $OUT/dev_fb15k-train_100_pruned.jsonl
fi
