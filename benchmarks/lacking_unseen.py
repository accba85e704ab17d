"""The lacking-key check over relation names the adapter never trained on (probes.compared_relations "unseen"; the
saved signal `lacking_unseen` of eval grounding --save-answers), on top of the shipped rule: answerable /
unanswerable questions refused per threshold, on saved answers. The three dev sets of FB15k-237's own names cannot
calibrate it (they hold no unseen name); the dev set of training facts under held-out aliases
(make_dev_set.py ... aliases) can, and is printed first. Nothing here runs a model.

    .venv/bin/python benchmarks/lacking_unseen.py benchmarks/results/alias_finetune/v4/dev_fb15k-train-aliases.jsonl \
        runs/own_refusal_s1.59/webnlg.jsonl --json benchmarks/results/alias_finetune/v4/lacking_unseen.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from refusal_rules import lacking, load, shipped_v5

from atlaskv.defaults import LACKING_RATIO

THRESHOLDS = [None, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0, 20.0]  # None: the shipped rule alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("answers", nargs="+", help="saved answers (eval grounding --save-answers), with lacking_unseen")
    ap.add_argument("--lacking-ratio", type=float, default=LACKING_RATIO, help="the trained pairs' threshold")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    for path in args.answers:
        rows = load([path])
        if not any("lacking_unseen" in r for r in rows):
            raise SystemExit(f"{path}: no lacking_unseen signal (saved before 2026-12-08: rerun eval grounding)")
        for key in sorted({r["key"] for r in rows}):
            sub = [r for r in rows if r["key"] == key]
            line = {}
            for t in THRESHOLDS:
                def refused(r, t=t):
                    return shipped_v5(r) or lacking(r) >= args.lacking_ratio or (
                        t is not None and lacking(r, "lacking_unseen") >= t)
                a = float(np.mean([refused(r) for r in sub if r["answerable"]]))
                u = float(np.mean([refused(r) for r in sub if not r["answerable"]]))
                line["shipped" if t is None else f"unseen >= {t}"] = [round(a, 3), round(u, 3)]
            out[f"{key[0]} {key[1]}"] = line
            print(f"{key[0]} {key[1]} (answerable / unanswerable refused)")
            for name, (a, u) in line.items():
                print(f"   {name:14s} {a:.3f} / {u:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"lacking_ratio": args.lacking_ratio, "answers": args.answers,
                                               "refused": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
