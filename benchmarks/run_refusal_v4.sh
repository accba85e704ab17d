#!/usr/bin/env bash
# Refusal v4's data: the answers of the default path (HiKVP pruned, value decoding, shipped rule) at 1,000
# entries with every refusal signal saved, now also the model's own log-probability of the top-cited value
# (value_logprob: how hard value decoding had to push it). Calibration on the three dev sets of training facts
# (random, same-head, held-out phrasings); pararel, fb15k-para and WebNLG are scored, never calibrated on.
#   bash benchmarks/run_refusal_v4.sh   -> benchmarks/results/refusal_v4/*.json, *.jsonl, rules.json
#   (WebNLG's answers go to runs/refusal_v4/: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/refusal_v4}  # run_refusal_v5.sh: the same runs into refusal_v5/
PRIVATE=${PRIVATE:-runs/refusal_v4}
mkdir -p $OUT $PRIVATE
ev() { .venv/bin/atlaskv eval grounding --sizes 1000 --questions 200 --answer-questions 200 --prune \
  --refuse-below ${REFUSE_BELOW:-5.88} "$@"; }
[ -d runs/dev/fb15k-train-6k ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-6k 6000
[ -d runs/dev/fb15k-train-heads ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-heads 6000 0 by-head
[ -d runs/dev/fb15k-train-para ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-para 6000 0 paraphrased
[ -d runs/eval/webnlg ] || .venv/bin/python benchmarks/make_webnlg_set.py runs/eval/webnlg
for set in fb15k-train-6k fb15k-train-heads fb15k-train-para; do
  d=random; [ $set = fb15k-train-heads ] && d=same-head
  [ -s $OUT/dev_$set.jsonl ] || ev --set runs/dev/$set --distractors $d --json $OUT/dev_$set.json --save-answers $OUT/dev_$set.jsonl
done
for set in pararel fb15k-para; do
  d=random; [ $set = fb15k-para ] && d=same-head
  [ -s $OUT/$set.jsonl ] || ev --set ${ATLASKV_SHARED:-../shared}/eval/$set --distractors $d --json $OUT/$set.json \
    --save-answers $OUT/$set.jsonl
done
[ -s $PRIVATE/webnlg.jsonl ] || ev --set runs/eval/webnlg --json $OUT/webnlg.json --save-answers $PRIVATE/webnlg.jsonl
.venv/bin/python benchmarks/refusal_rules.py --calibrate $OUT/dev_*.jsonl --score $OUT/pararel.jsonl \
  $OUT/fb15k-para.jsonl $PRIVATE/webnlg.jsonl --json $OUT/rules.json
