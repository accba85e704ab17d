"""A tuning ("dev") set in the evaluation-set format, built from the *training* facts
(data/fb15k237-train.tsv), so inference settings such as the token-value gain are picked without looking at
the evaluation sets in ../shared/eval. Questions use the training templates (train.QUESTION_TEMPLATES), one
per fact, picked by a seeded RNG; the pool is a seeded sample of the facts. Deterministic.

    .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train 2000
    .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-heads 6000 0 by-head

`by-head` takes whole entities (every training fact of a seeded sample of heads) instead of single facts, so
`eval grounding --distractors same-head` finds the question's other facts in the pool, as on fb15k-para.
The facts were seen in training (the adapter has no held-out train facts), so a dev score is optimistic
about retrieval; it is meant for choosing settings that the training never touched.
"""
import json
import sys
from pathlib import Path

import numpy as np

from atlaskv.kb.triples import read_triples
from atlaskv.train import QUESTION_TEMPLATES

REPO = Path(__file__).resolve().parents[1]


def main(out: str, n: int = 2000, seed: int = 0, mode: str = "facts") -> None:
    triples = read_triples(REPO / "data" / "fb15k237-train.tsv").triples
    rng = np.random.default_rng(seed)
    if mode == "by-head":
        by_head: dict[str, list[int]] = {}
        for i, t in enumerate(triples):
            by_head.setdefault(t.head, []).append(i)
        heads, rows = sorted(by_head), []
        for h in rng.permutation(len(heads)):
            if len(rows) >= n:
                break
            rows += by_head[heads[h]][:n - len(rows)]
        picked = [triples[i] for i in sorted(rows)]
    else:
        picked = [triples[i] for i in sorted(rng.permutation(len(triples))[:n])]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "triples.tsv", "w", encoding="utf-8") as f:
        for t in picked:
            f.write(f"{t.head}\t{t.relation}\t{t.tail}\n")
    with open(out_dir / "questions.jsonl", "w", encoding="utf-8") as f:
        for t in picked:
            key = f"the {t.relation} of {t.head}"
            tpl = QUESTION_TEMPLATES[rng.integers(len(QUESTION_TEMPLATES))]
            q = tpl.format(k=key, K=key[0].upper() + key[1:])
            f.write(json.dumps(dict(question=q, head=t.head, relation=t.relation, tail=t.tail)) + "\n")
    print(f"{out_dir}: {len(picked)} triples and questions from data/fb15k237-train.tsv (seed {seed})")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]), *sys.argv[4:5])
