"""OWN_REFUSAL_BELOW from saved answers (no model runs): among the model's own "I don't know." whose top fact's head
the question names, the supports of the unanswerable ones the refusal rule would let through if they named the
top value (lacking ratio under LACKING_RATIO) and of the answerable ones with the gold fact cited first; the
threshold is midway between the highest of the first and the lowest of the second above it.

    .venv/bin/python benchmarks/own_refusal_calibration.py benchmarks/results/samerel_finetune/negatives24/dev_*.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_rules import lacking, load, support

from atlaskv.defaults import LACKING_RATIO, REFUSAL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("answers", nargs="+", help="saved answers of the dev sets (.jsonl)")
    args = ap.parse_args()
    lose, gain = [], []
    for path in args.answers:
        gold_first = {(r["question"], r["kb_size"]): r["top_is_gold"]
                      for r in map(json.loads, Path(path).open(encoding="utf-8"))}
        for r in load([path]):
            if r["answer"].strip() != REFUSAL or not r.get("head_named"):
                continue
            if r["answerable"] and gold_first[(r["question"], r["key"][1])]:
                gain.append((support(r), path, r["question"]))
            elif not r["answerable"] and lacking(r) < LACKING_RATIO:
                lose.append((support(r), path, r["question"]))
    for name, rows in (("let through if answered", lose), ("answerable, gold cited first", gain)):
        print(f"{name}: " + "; ".join(f"{s:.3f} {q!r}" for s, _, q in sorted(rows)))
    top = max((s for s, _, _ in lose), default=0.0)
    above = [s for s, _, _ in gain if s > top]
    if above:
        print(f"OWN_REFUSAL_BELOW = {(top + min(above)) / 2:.4f} (midway between {top:.3f} and {min(above):.3f})")


if __name__ == "__main__":
    main()
