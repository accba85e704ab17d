"""Natural question phrasings of FB15k-237's relations for training (`atlaskv train --phrasings`).

    .venv/bin/python scripts/make_phrasings.py      # data/fb15k237-phrasings-written.tsv -> data/fb15k237-phrasings.tsv

`fb15k237-phrasings-written.tsv` holds 4 questions per training relation ("Where did {head} die?",
"What is {head}'s birthplace?", ...), written by hand (by an agent given only the relation names and two
training facts each, never the evaluation or dev questions). Evaluations ask in phrasings that training never
used, so any phrasing that is, with its head put back, word for word a question template of an evaluation set
(../shared/eval, the WebNLG set of benchmarks/make_webnlg_set.py) or of the held-out-phrasing dev set
(benchmarks/make_dev_set.py ... paraphrased) is dropped (decontamination). Deterministic.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fb15k_relations import REPO, shared_dir  # noqa: E402

WRITTEN = REPO / "data" / "fb15k237-phrasings-written.tsv"
OUT = REPO / "data" / "fb15k237-phrasings.tsv"
HELD_OUT = ["eval/fb15k/questions.jsonl", "eval/fb15k-para/questions.jsonl", "eval/pararel/questions.jsonl",
            "eval/fb15k-dense/questions.jsonl"]
BUILT = ["runs/eval/webnlg/questions.jsonl", "runs/dev/fb15k-train-para/questions.jsonl"]


def templates(path: Path) -> set[str]:
    """The questions of a set with their head replaced by {head}, case-blind."""
    out = set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            out.add(q["question"].replace(q["head"], "{head}").casefold())
    return out


def main() -> None:
    held: set[str] = set()
    for p in [shared_dir() / h for h in HELD_OUT] + [REPO / b for b in BUILT]:
        if not p.exists():
            raise SystemExit(f"{p} missing: build it first (see this script's docstring) so nothing held out leaks in")
        held |= templates(p)
    lines = WRITTEN.read_text("utf-8").splitlines()
    kept = [ln for ln in lines[1:] if ln.split("\t")[1].casefold() not in held]
    OUT.write_text("\n".join([lines[0], *kept]) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(kept)} of {len(lines) - 1} phrasings kept, {len(lines) - 1 - len(kept)} held out "
          f"(word for word a question template of an evaluation or dev set)")


if __name__ == "__main__":
    main()
