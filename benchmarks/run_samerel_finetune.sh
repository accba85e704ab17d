#!/usr/bin/env bash
# A fine-tune whose questions sit among other entities' facts of their relation (`atlaskv train
# --same-relation-negatives`), measured on the default path (HiKVP pruned, value decoding, 200 questions each with
# and without its gold fact) at 1,000 entries on every set and at 100 on fb15k, then the refusal thresholds
# recalibrated on its own dev answers (refusal_rules.py; dev sets of training facts only). SETS=sizes: fb15k-para and
# pararel at 100 and 10^4, fb15k at 5,887, WebNLG at 100 and 1,668 (into $OUT/sizes/).
#   ADAPTER=runs/ft-samerel24-fp16 OUT=benchmarks/results/samerel_finetune/negatives24 bash benchmarks/run_samerel_finetune.sh
#   (the measured adapter is also in benchmarks/results/samerel_finetune/negatives24/adapter/)
#   fb15k-train-aliases: the dev set under relation names training never used (make_dev_set.py ... aliases)
#   (WebNLG's answers go to $PRIVATE: CC BY-NC-SA, never committed; only its scores are)
set -euo pipefail
cd "$(dirname "$0")/.."
ADAPTER=${ADAPTER:?the adapter folder to measure}
OUT=${OUT:-benchmarks/results/samerel_finetune}
PRIVATE=${PRIVATE:-runs/samerel_finetune}
SETS=${SETS:-"fb15k fb15k-train-para fb15k-train-heads fb15k-train-6k fb15k-train-aliases fb15k-para pararel webnlg"}
mkdir -p $OUT $PRIVATE
E=${ATLASKV_SHARED:-../shared}/eval
ev() { .venv/bin/atlaskv eval grounding --questions 200 --answer-questions 200 --prune --refuse-below 5.88 \
  --adapter $ADAPTER "$@"; }
for set in $SETS; do
  case $set in
    fb15k) [ -s $OUT/fb15k.jsonl ] || ev --set $E/fb15k --sizes 100,1000 --json $OUT/fb15k.json --save-answers $OUT/fb15k.jsonl ;;
    fb15k-para) [ -s $OUT/$set.jsonl ] || ev --set $E/$set --sizes 1000 --distractors same-head --json $OUT/$set.json --save-answers $OUT/$set.jsonl ;;
    pararel) [ -s $OUT/$set.jsonl ] || ev --set $E/$set --sizes 1000 --json $OUT/$set.json --save-answers $OUT/$set.jsonl ;;
    webnlg) [ -s $PRIVATE/webnlg.jsonl ] || ev --set runs/eval/webnlg --sizes 1000 --json $OUT/webnlg.json --save-answers $PRIVATE/webnlg.jsonl ;;
    sizes) mkdir -p $OUT/sizes  # the other points of the answer targets: 100 and 10^4 (fb15k: 5,887)
      for s in fb15k-para pararel fb15k; do
        d=random; [ $s = fb15k-para ] && d=same-head; z=100,10000; [ $s = fb15k ] && z=5887
        [ -s $OUT/sizes/$s.jsonl ] || ev --set $E/$s --sizes $z --distractors $d --json $OUT/sizes/$s.json \
          --save-answers $OUT/sizes/$s.jsonl
      done
      [ -s $PRIVATE/webnlg_sizes.jsonl ] || ev --set runs/eval/webnlg --sizes 100,1668 --json $OUT/sizes/webnlg.json \
        --save-answers $PRIVATE/webnlg_sizes.jsonl ;;
    fb15k-train-*) d=random; case $set in fb15k-train-heads|fb15k-train-aliases) d=same-head ;; esac
      [ -s $OUT/dev_$set.jsonl ] || ev --set runs/dev/$set --sizes 1000 --distractors $d --json $OUT/dev_$set.json \
        --save-answers $OUT/dev_$set.jsonl ;;
  esac
done
# the thresholds come from the three dev sets of FB15k-237's own relation names; the one under unseen names is scored
score=(); for f in $OUT/fb15k-para.jsonl $OUT/pararel.jsonl $PRIVATE/webnlg.jsonl $OUT/dev_fb15k-train-aliases.jsonl; do
  if [ -s $f ]; then score+=($f); fi; done
cal=(); for f in $OUT/dev_fb15k-train-{6k,heads,para}.jsonl; do if [ -s $f ]; then cal+=($f); fi; done
if [ ${#cal[@]} -gt 0 ] && [ ${#score[@]} -gt 0 ]; then
  .venv/bin/python benchmarks/refusal_rules.py --calibrate "${cal[@]}" --score "${score[@]}" --json $OUT/rules.json
fi
