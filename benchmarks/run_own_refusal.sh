#!/usr/bin/env bash
# Value decoding's ban on the model's own "I don't know." when the question names the top fact's head, at a lower
# support than the trust guard's (OWN_REFUSAL_BELOW, model/decoding.py): the three dev sets of training facts (where
# it is calibrated), then fb15k-para and fb15k at 1,000, default path, 200 questions each with and without the gold
# fact, the shipped refusal rule scored beside.
#   S=1.59 bash benchmarks/run_own_refusal.sh   -> benchmarks/results/own_refusal/s<S>/
#   S=1.59 SETS="webnlg pararel fb15k-train-aliases" bash benchmarks/run_own_refusal.sh   (the shipped setting elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${S:?the support from which the model may not open with its own refusal}
OUT=benchmarks/results/own_refusal/s$S
E=${ATLASKV_SHARED:-../shared}/eval
mkdir -p $OUT
ev() { .venv/bin/python benchmarks/decoding_sweep.py OWN_REFUSAL_BELOW=$S -- eval grounding --sizes 1000 \
  --questions 200 --answer-questions 200 --prune --refuse-below 5.88 "$@"; }
PRIVATE=runs/own_refusal_s$S  # WebNLG's answers (CC BY-NC-SA): never committed, only its scores
mkdir -p $PRIVATE
# SETS may also name pararel, webnlg and fb15k-train-aliases (the dev set under unseen relation names)
for set in ${SETS:-fb15k-train-para fb15k-train-heads fb15k-train-6k fb15k-para fb15k}; do
  d=random; case $set in fb15k-train-heads|fb15k-train-aliases|fb15k-para) d=same-head ;; esac
  src=runs/dev/$set; case $set in fb15k-para|fb15k|pararel) src=$E/$set ;; webnlg) src=runs/eval/webnlg ;; esac
  saved=$OUT/$set.jsonl; [ $set = webnlg ] && saved=$PRIVATE/$set.jsonl
  [ -s $saved ] || ev --set $src --distractors $d --json $OUT/$set.json --save-answers $saved
done
