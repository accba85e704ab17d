"""The lacking-key check at other ratios, and only below a support ceiling, scored on saved answers (no model
runs): for every (ratio, ceiling) that keeps each calibration file's answerable refusals at or under --max-false,
answerable / unanswerable refused on every file. The shipped rule is ceiling inf at LACKING_RATIO.

    .venv/bin/python benchmarks/refusal_grid.py --calibrate benchmarks/results/samerel_finetune/negatives24/dev_*.jsonl \
        --score benchmarks/results/answer_targets/atlaskv_fb15k-para.jsonl --kb-size 1000
"""
from __future__ import annotations

import argparse
import math

from refusal_rules import lacking, load, shipped_v5, support

RATIOS = (1.1, 1.2, 1.283, 1.4, 1.6, 1.8, 2.0, 2.5)
CEILINGS = (5, 8, 10, 12, 15, 20, 30, math.inf)


def refused(rows: list[dict], ratio: float, ceiling: float) -> tuple[float, float]:
    def refuses(r):
        return shipped_v5(r) or (lacking(r) >= ratio and support(r) < ceiling)
    a = [r for r in rows if r["answerable"]]
    u = [r for r in rows if not r["answerable"]]
    return sum(map(refuses, a)) / max(len(a), 1), sum(map(refuses, u)) / max(len(u), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibrate", nargs="+", required=True, help="dev sets' saved answers")
    ap.add_argument("--score", nargs="+", required=True, help="saved answers to score")
    ap.add_argument("--kb-size", type=int, help="only rows at this KB size")
    ap.add_argument("--max-false", type=float, default=0.03)
    args = ap.parse_args()
    dev = {p: load([p]) for p in args.calibrate}
    score = {p: [r for r in load([p]) if args.kb_size in (None, r["key"][1])] for p in args.score}
    for ratio in RATIOS:
        for ceiling in CEILINGS:
            d = [refused(rows, ratio, ceiling) for rows in dev.values()]
            if max(a for a, _ in d) > args.max_false:
                continue
            s = [refused(rows, ratio, ceiling) for rows in score.values()]
            print(f"ratio {ratio:5.3f} ceiling {ceiling:>4}: dev " + "  ".join(f"{a:.3f}/{u:.3f}" for a, u in d)
                  + " | scored " + "  ".join(f"{a:.3f}/{u:.3f}" for a, u in s))


if __name__ == "__main__":
    main()
