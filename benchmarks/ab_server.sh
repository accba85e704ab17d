#!/usr/bin/env bash
# The batched server of this checkout against the one of another commit (a git worktree of REF), under the
# same load, in alternating rounds (this machine drifts 10-20 % between runs: compare within a round).
#   bash benchmarks/ab_server.sh REF [ROUNDS] [load_server.py options]
#   e.g. bash benchmarks/ab_server.sh f26f206 2 --clients 20 --requests 10 --max-tokens 32
# -> benchmarks/results/ab_server/<REF|this>_<round>.json (load_server.py's JSON each)
set -euo pipefail
cd "$(dirname "$0")/.."
REF=$1; ROUNDS=${2:-2}; shift; [ $# -gt 0 ] && shift
WT=/tmp/atlaskv-ab-$REF
[ -d $WT ] || git worktree add --detach $WT $REF >/dev/null
OUT=${AB_OUT:-benchmarks/results/ab_server}
mkdir -p $OUT
for r in $(seq 1 $ROUNDS); do
  order="this $REF"; [ $((r % 2)) -eq 0 ] && order="$REF this"
  for side in $order; do
    src=(); [ $side != this ] && src=(--server-src $WT/src)
    .venv/bin/python benchmarks/load_server.py "$@" "${src[@]}" --out $OUT/${side}_$r.json
  done
done
