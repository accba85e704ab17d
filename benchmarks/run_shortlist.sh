#!/usr/bin/env bash
# Grounding with and without the shortlist (HiKVP route both: the KB query heads score only the candidates
# nearest the question): ACC@1 / ACC@5 / pruning recall on the three dev sets at 10^4 (fb15k: its 5,887) and
# the 40,844-fact pool, 500 questions, seed 0. Results: benchmarks/results/shortlist/*.json.
#   bash benchmarks/run_shortlist.sh [SHORTLISTS]     (default "0 512"; ~12 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ATLASKV_SHARED:-../shared}
OUT=benchmarks/results/shortlist
mkdir -p $OUT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for s in ${1:-0 512}; do
  ev() { .venv/bin/atlaskv eval grounding --questions 500 --no-answers --shortlist $s "$@"; }
  ev --set $SHARED/eval/fb15k --sizes 10000 --json $OUT/fb15k_s$s.json
  ev --set $SHARED/eval/pararel --sizes 10000 --json $OUT/pararel_s$s.json
  ev --set $SHARED/eval/fb15k-para --distractors same-head --sizes 10000,40844 --json $OUT/fb15k-para_samehead_s$s.json
done
.venv/bin/python - <<'PY'
import json, pathlib
rows = []
for f in sorted(pathlib.Path("benchmarks/results/shortlist").glob("*_s*.json")):
    d = json.loads(f.read_text())
    for r in d["results"]:
        rows.append({"set": d["set"], "distractors": d["distractors"], "shortlist": d["prune"]["shortlist"],
                     **{k: r[k] for k in ("kb_size", "n_questions", "acc1", "acc5", "pruning_recall", "seconds")}})
pathlib.Path("benchmarks/results/shortlist/summary.json").write_text(json.dumps(rows, indent=1) + "\n")
for r in rows:
    print(r)
PY
