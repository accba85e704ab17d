#!/usr/bin/env bash
# The answer text without an opening article that goes straight into a cited value (model/decoding.py `spoken`:
# the tokens "The Male." read "Male."; the own-refusal ban now also covers the spaced " I"):
# the three dev sets of training facts and the dev set of unseen relation names at 1,000 (default path, 200
# questions each with and without the gold fact, the shipped refusal rule scored beside), then WebNLG at 1,000.
#   bash benchmarks/run_article_opening.sh   -> benchmarks/results/article_opening/
# The answer targets themselves: bash benchmarks/run_answer_targets.sh (answer_targets/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/article_opening
PRIVATE=runs/article_opening  # WebNLG's answers (CC BY-NC-SA): never committed, only its scores
mkdir -p $OUT $PRIVATE
for set in ${SETS:-fb15k-train-para fb15k-train-heads fb15k-train-6k fb15k-train-aliases webnlg}; do
  d=random; case $set in fb15k-train-heads|fb15k-train-aliases) d=same-head ;; esac
  src=runs/dev/$set; [ $set = webnlg ] && src=runs/eval/webnlg
  saved=$OUT/$set.jsonl; [ $set = webnlg ] && saved=$PRIVATE/$set.jsonl
  [ -s $saved ] || .venv/bin/atlaskv eval grounding --set $src --distractors $d --sizes 1000 --questions 200 \
    --answer-questions 200 --prune --refuse-below 5.88 --json $OUT/$set.json --save-answers $saved
done
