#!/usr/bin/env bash
# Issue 22's answer targets: answer_exact on the default path (HiKVP pruned, value decoding on, refusal scored
# beside) at 100 / 1,000 / 10,000 entries (fb15k: its 5,887) on the three sets, beside the other methods with
# the same SmolLM2 and the same metric: rag (top-5 facts in the prompt), kblam (flat KB attention, the same
# adapter and decoding), icl (every fact in the prompt: 100 only, 1,000 facts overflow SmolLM2's window),
# zeroshot (the question alone); seed 0, 200 questions per point.
#   bash benchmarks/run_answer_targets.sh   -> benchmarks/results/answer_targets/*.json, *.jsonl
#   (SETS="pararel" METHODS="rag" ... for a part; METHODS="kblam icl zeroshot" for the other three)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${ATLASKV_SHARED:-../shared}/eval
OUT=benchmarks/results/answer_targets
Q=${Q:-200}
mkdir -p $OUT
for set in ${SETS:-fb15k pararel fb15k-para}; do
  d=random; [ $set = fb15k-para ] && d=same-head
  sizes=${SIZES:-100,1000,10000}; [ $set = fb15k ] && sizes=${SIZES:-100,1000,5887}
  for m in ${METHODS:-atlaskv rag}; do
    if [ $m = atlaskv ]; then
      .venv/bin/atlaskv eval grounding --set $S/$set --sizes $sizes --questions $Q --answer-questions $Q \
        --distractors $d --prune --refuse-below ${REFUSE_BELOW:-5.88} --json $OUT/atlaskv_${set}.json --save-answers $OUT/atlaskv_${set}.jsonl
    elif [ $m = kblam ]; then
      .venv/bin/atlaskv eval grounding --set $S/$set --sizes $sizes --questions $Q --answer-questions $Q \
        --distractors $d --method kblam --refuse-below ${REFUSE_BELOW:-5.88} --json $OUT/kblam_${set}.json \
        --save-answers $OUT/kblam_${set}.jsonl
    else
      at=$sizes; [ $m = icl ] && at=100
      .venv/bin/atlaskv eval grounding --set $S/$set --sizes $at --questions $Q --answer-questions $Q \
        --distractors $d --method $m --json $OUT/${m}_${set}.json
    fi
  done
done
