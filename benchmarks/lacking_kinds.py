"""How refusal v7 depends on LACKING_KIND_SHARE, scored offline on saved answers (no model runs): each saved
answer's lacking relations (the best five the v6 check kept, `signals.lacking.top`) are kept only where at least
`share` of the adapter's training heads holding one of the entity's relations also hold them
(relation_pairs.tsv), LACKING_RATIO is calibrated on the dev sets as refusal_rules.py does ("v5 or lacking key"),
and every set is scored at it. The entity's relations are read from its set's triples.tsv (the check itself
reads them from the 32 most-cited rows), less the gold fact's when it was removed.

    .venv/bin/python benchmarks/lacking_kinds.py --calibrate benchmarks/results/refusal_v6/dev_*.jsonl \
        --score benchmarks/results/refusal_v6/pararel.jsonl benchmarks/results/refusal_v6/fb15k-para.jsonl \
        --json benchmarks/results/refusal_v7/lacking_kinds.json
At 0.01 it reproduces the end-to-end run of run_refusal_v7.sh (fb15k-para 0.075 / 0.935, pararel 0.030 / 1.000).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from refusal_rules import arguments, calibrate, load, refusal_scores, shipped_v5

from atlaskv.model.adapter import PAIRS_NAME, read_relation_pairs
from atlaskv.model.atlaskv import default_adapter_dir

SHARES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)  # 0: v6 (no kinds)
SHARED = Path(os.environ.get("ATLASKV_SHARED", "../shared"))
SET_DIRS = {"fb15k-para": SHARED / "eval/fb15k-para", "pararel": SHARED / "eval/pararel",
            **{s: Path("runs/dev") / s for s in ("fb15k-train-6k", "fb15k-train-heads", "fb15k-train-para")}}


def entity_relations(set_name: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """head -> its relations in the set's triples; question -> its gold relation."""
    held = defaultdict(set)
    folder = SET_DIRS[set_name]
    for line in (folder / "triples.tsv").read_text("utf-8").splitlines():
        h, r, _ = line.split("\t")
        held[h].add(r)
    gold = {q["question"]: q["relation"] for q in map(json.loads, (folder / "questions.jsonl").open(encoding="utf-8"))}
    return held, gold


def kinds_ratio(r: dict, pairs, share: float, held: dict, gold: dict) -> float:
    lk = r.get("lacking")
    if not lk or not lk.get("top"):
        return 0.0
    if share <= 0:
        return lk["ratio"]
    head = r["cited"][r["backing"]][0]
    mine = held.get(head, set()) - (set() if r["answerable"] else {gold.get(r["question"])})
    mine = [s for s in mine if pairs.get((s, s), 0)]
    keep = [x for rel, x in lk["top"] if any(0 < pairs.get((s, rel), 0) >= share * pairs[(s, s)] for s in mine)]
    return max(keep, default=0.0)


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    pairs = read_relation_pairs(default_adapter_dir() / PAIRS_NAME)
    cal, scored = load(args.calibrate), load(args.score)
    sets = {}
    for r in cal + scored:
        if r["key"][0] not in sets:
            sets[r["key"][0]] = entity_relations(r["key"][0])
    rule = lambda r, t: shipped_v5(r) or -r["kinds"] < t  # noqa: E731
    out = {"shares": {}}
    for share in SHARES:
        for r in cal + scored:
            r["kinds"] = kinds_ratio(r, pairs, share, *sets[r["key"][0]])
        t = calibrate(cal, rule, lambda r: -r["kinds"], args.max_false)
        groups = defaultdict(list)
        for r in scored + cal:
            groups[f"{r['key'][0]} {r['key'][1]}"].append(r)
        scores = {k: refusal_scores(g, lambda r: rule(r, t)) for k, g in sorted(groups.items())}
        out["shares"][str(share)] = {"lacking_ratio": None if t is None else round(-t, 4), "scores": scores}
        print(f"share {share}: LACKING_RATIO {-t:.4f}  " + "  ".join(
            f"{k} {v['refused_answerable']:.3f}/{v['refused_unanswerable']:.3f}" for k, v in scores.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", "utf-8")


if __name__ == "__main__":
    main()
