#!/usr/bin/env bash
# Refusal v7: v6's lacking-key check compares only relations an entity holding the answer's facts may hold
# (relation_pairs.tsv in the adapter folder: two relations sharing a head in at least LACKING_KIND_SHARE of the
# training heads holding one), and LACKING_RATIO is recalibrated on the dev sets' answers of this code
# (refusal_rules.py, "v5 or lacking key"). The runs of run_refusal_v4.sh into their own folders, then the same
# at 100 and 10^4 entries (fb15k: 5,887; WebNLG: 1,668) into refusal_v7/sizes/, and fb15k at 1,000.
#   bash benchmarks/run_refusal_v7.sh   -> benchmarks/results/refusal_v7/*.json, *.jsonl, rules.json, sizes/
#   (WebNLG's answers go to runs/refusal_v7/: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/refusal_v7 PRIVATE=runs/refusal_v7 bash benchmarks/run_refusal_v4.sh
OUT=benchmarks/results/refusal_v7
ev() { .venv/bin/atlaskv eval grounding --questions 200 --answer-questions 200 --prune --refuse-below 5.88 "$@"; }
E=${ATLASKV_SHARED:-../shared}/eval
[ -s $OUT/fb15k.jsonl ] || ev --set $E/fb15k --sizes 1000 --json $OUT/fb15k.json --save-answers $OUT/fb15k.jsonl
mkdir -p $OUT/sizes
[ -s $OUT/sizes/pararel.jsonl ] || ev --set $E/pararel --sizes 100,10000 --json $OUT/sizes/pararel.json \
  --save-answers $OUT/sizes/pararel.jsonl
[ -s $OUT/sizes/fb15k-para.jsonl ] || ev --set $E/fb15k-para --distractors same-head --sizes 100,10000 \
  --json $OUT/sizes/fb15k-para.json --save-answers $OUT/sizes/fb15k-para.jsonl
[ -s $OUT/sizes/fb15k.jsonl ] || ev --set $E/fb15k --sizes 100,5887 --json $OUT/sizes/fb15k.json \
  --save-answers $OUT/sizes/fb15k.jsonl
[ -s runs/refusal_v7/webnlg_sizes.jsonl ] || ev --set runs/eval/webnlg --sizes 100,1668 --json $OUT/sizes/webnlg.json \
  --save-answers runs/refusal_v7/webnlg_sizes.jsonl
for set in fb15k-train-para fb15k-train-heads fb15k-train-6k; do
  d=random; [ $set = fb15k-train-heads ] && d=same-head
  [ -s $OUT/sizes/dev_$set.jsonl ] || ev --set runs/dev/$set --distractors $d --sizes 100 \
    --json $OUT/sizes/dev_$set.json --save-answers $OUT/sizes/dev_$set.jsonl
done
