#!/usr/bin/env bash
# Refusal v5: the shipped rule with a backing fact (model/refusal.py `backing`): a fact about the entity the
# question names, cited after a neighbour entity's, backs an answer that names its value (v4 refused it by
# the head check whatever the answer said). Same runs as run_refusal_v4.sh (default path, 1,000 entries, 200
# questions, each with and without its gold fact); nothing is recalibrated (REFUSE_BELOW 5.88 as shipped).
#   bash benchmarks/run_refusal_v5.sh   -> benchmarks/results/refusal_v5/*.json, *.jsonl
#   (WebNLG's answers go to runs/refusal_v5/: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/refusal_v5
PRIVATE=runs/refusal_v5
mkdir -p $OUT $PRIVATE
ev() { .venv/bin/atlaskv eval grounding --sizes 1000 --questions 200 --answer-questions 200 --prune \
  --refuse-below ${REFUSE_BELOW:-5.88} "$@"; }
[ -d runs/eval/webnlg ] || .venv/bin/python benchmarks/make_webnlg_set.py runs/eval/webnlg
for set in pararel fb15k-para; do
  d=random; [ $set = fb15k-para ] && d=same-head
  [ -s $OUT/$set.jsonl ] || ev --set ${ATLASKV_SHARED:-../shared}/eval/$set --distractors $d --json $OUT/$set.json \
    --save-answers $OUT/$set.jsonl
done
[ -s $PRIVATE/webnlg.jsonl ] || ev --set runs/eval/webnlg --json $OUT/webnlg.json --save-answers $PRIVATE/webnlg.jsonl
[ -d runs/dev/fb15k-train-6k ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-6k 6000
[ -d runs/dev/fb15k-train-heads ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-heads 6000 0 by-head
[ -d runs/dev/fb15k-train-para ] || .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-para 6000 0 paraphrased
for set in fb15k-train-6k fb15k-train-heads fb15k-train-para; do
  d=random; [ $set = fb15k-train-heads ] && d=same-head
  [ -s $OUT/dev_$set.jsonl ] || ev --set runs/dev/$set --distractors $d --json $OUT/dev_$set.json --save-answers $OUT/dev_$set.jsonl
done
