"""Where the answers that miss answer_exact fail, counted from saved answers (no model needed).

Reads the JSONL that `atlaskv eval grounding --save-answers` writes and sorts every answer that is not
exact into the first stage that fails, per KB size:

  grounding     the most cited fact is not the gold one
  not said      the gold value does not appear as a whole name (another value, a garbled one, none)
  not first     it appears, but another KB value is named before it
  loop          a word 3-gram repeats
  unfinished    the turn did not end within the token budget

    python benchmarks/answer_failures.py benchmarks/results/answer_targets/atlaskv_pararel.jsonl [--examples 3]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

STAGES = ("grounding", "not said", "not first", "loop", "unfinished")


def stage(row: dict) -> str | None:
    if row["exact"]:
        return None
    if not row["top_is_gold"]:
        return "grounding"
    if not row["named"]:
        return "not said"
    if not row["gold_first"]:
        return "not first"
    if row["loop"]:
        return "loop"
    return "unfinished"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("answers", nargs="+", help="JSONL files from eval grounding --save-answers")
    ap.add_argument("--examples", type=int, default=0, help="print this many answers per stage and size")
    args = ap.parse_args()
    for path in args.answers:
        rows = [json.loads(line) for line in open(path)]
        by_size: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            by_size[r["kb_size"]].append(r)
        print(path)
        for size, rs in sorted(by_size.items()):
            counts = Counter(stage(r) for r in rs)
            parts = "  ".join(f"{s} {counts[s]}" for s in STAGES)
            print(f"  KB {size:>6,}: {len(rs)} answers, exact {counts[None]}  |  {parts}")
            for s in STAGES:
                for r in [r for r in rs if stage(r) == s][:args.examples]:
                    print(f"      [{s}] {r['question']}  gold: {r['gold']}  ->  {r['answer'][:120]}")


if __name__ == "__main__":
    main()
