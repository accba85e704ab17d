#!/usr/bin/env bash
# Refusal v3's data: the answers of the default path (HiKVP pruned, value decoding) with every refusal signal
# saved per answer, with and without the gold fact (eval grounding --save-answers: head named, value support,
# question-key cosines). Calibration on the dev sets of training facts (random and same-head distractors,
# KB of 1,000), then the answer-target runs on the evaluation sets score the rule picked there.
#   bash benchmarks/run_refusal_signals.sh   -> benchmarks/results/refusal_v3/*.json, *.jsonl, rules.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/refusal_v3
mkdir -p $OUT
[ -d runs/dev/fb15k-train-6k ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-6k 6000
[ -d runs/dev/fb15k-train-heads ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-heads 6000 0 by-head
for d in random same-head; do
  set=fb15k-train-6k; [ $d = same-head ] && set=fb15k-train-heads
  .venv/bin/atlaskv eval grounding --set runs/dev/$set --sizes ${SIZES:-1000} --questions 200 --answer-questions 200 \
    --distractors $d --prune --refuse-below ${REFUSE_BELOW:-1.86} --json $OUT/dev_${set}.json --save-answers $OUT/dev_${set}.jsonl
done
# the evaluation sets' answers at 1,000 with the same signals (scored, never calibrated on)
for set in pararel fb15k-para; do
  d=random; [ $set = fb15k-para ] && d=same-head
  .venv/bin/atlaskv eval grounding --set ${ATLASKV_SHARED:-../shared}/eval/$set --sizes 1000 --questions 200 \
    --answer-questions 200 --distractors $d --prune --refuse-below ${REFUSE_BELOW:-1.86} \
    --json $OUT/${set}_1000.json --save-answers $OUT/${set}_1000.jsonl
done
.venv/bin/python benchmarks/refusal_rules.py --calibrate $OUT/dev_*.jsonl --score $OUT/pararel_1000.jsonl \
  $OUT/fb15k-para_1000.jsonl --json $OUT/rules.json
