"""Where the shipped refusal rule (v7: refusal_rules.shipped_v5, or the lacking-key ratio >= LACKING_RATIO) misses,
read from saved answers (eval grounding --save-answers; no model runs): the answerable questions it refuses,
split by which part refused and by the answer's own stage (gold fact cited first or not, answer exact or not,
the model's own "I don't know."), and the unanswerable ones it lets through, counted by gold relation (from
--set's questions.jsonl).

    .venv/bin/python benchmarks/refusal_misses.py benchmarks/results/refusal_v7/fb15k-para.jsonl \
        --set ../shared/eval/fb15k-para [--kb-size 1000] [--examples]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from refusal_rules import lacking, load, shipped_v5

from atlaskv.defaults import LACKING_RATIO, REFUSAL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("answers", help="saved answers (.jsonl)")
    ap.add_argument("--set", help="the evaluation set's folder (questions.jsonl: gold relations)")
    ap.add_argument("--kb-size", type=int)
    ap.add_argument("--examples", action="store_true", help="print every miss")
    args = ap.parse_args()
    raw = {(r["question"], r["kb_size"]): r for r in map(json.loads, Path(args.answers).open(encoding="utf-8"))}
    gold_rel = {}
    if args.set:
        gold_rel = {q["question"]: q["relation"]
                    for q in map(json.loads, (Path(args.set) / "questions.jsonl").open(encoding="utf-8"))}
    rows = [r for r in load([args.answers]) if args.kb_size in (None, r["key"][1])]
    refused, through = Counter(), Counter()
    for r in rows:
        v5, lk = shipped_v5(r), lacking(r) >= LACKING_RATIO
        saved = raw[(r["question"], r["key"][1])]
        if r["answerable"] and (v5 or lk):
            stage = ("gold not cited first" if not saved["top_is_gold"] else
                     "own I don't know" if r["answer"].strip() == REFUSAL else
                     "exact" if saved["exact"] else "wrong or unfinished")
            refused[("v5" if v5 else "lacking key", stage)] += 1
            if args.examples:
                print(f"refused ({'v5' if v5 else 'lacking'}, {stage}): {r['question']} -> {r['answer'][:70]!r}")
        elif not r["answerable"] and not (v5 or lk):
            through[gold_rel.get(r["question"], "?")] += 1
            if args.examples:
                print(f"let through: {r['question']} -> {r['answer'][:70]!r}")
    n = sum(r["answerable"] for r in rows)
    print(f"{args.answers}: {n} answerable, {sum(refused.values())} refused:")
    for (part, stage), c in sorted(refused.items()):
        print(f"   {part:12s} {stage:22s} {c}")
    print(f"{len(rows) - n} unanswerable, {sum(through.values())} let through, over {len(through)} gold relations:")
    print("   " + ", ".join(f"{k} {c}" for k, c in through.most_common()))


if __name__ == "__main__":
    main()
