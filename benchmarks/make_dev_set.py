"""A tuning ("dev") set in the evaluation-set format, built from the *training* facts
(data/fb15k237-train.tsv), so inference settings such as the token-value gain are picked without looking at
the evaluation sets in ../shared/eval. Questions use the training templates (train.QUESTION_TEMPLATES), one
per fact, picked by a seeded RNG; the pool is a seeded sample of the facts. Deterministic.

    .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train 2000
    .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-heads 6000 0 by-head

`by-head` takes whole entities (every training fact of a seeded sample of heads) instead of single facts, so
`eval grounding --distractors same-head` finds the question's other facts in the pool, as on fb15k-para.
`paraphrased` asks the facts of the relations in PARAPHRASES (single-valued keys only) in phrasings the
adapter never saw in training (written for this set, not taken from any evaluation set): a dev set for
settings that must hold for users' own wording ("Is X a man or a woman?" for the gender of X).

    .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-para 6000 0 paraphrased

`aliases` asks those phrasings over whole entities (as `by-head`) in a KB whose relations carry names training
never used: each relation with a held-out alias (scripts/make_relation_aliases.py) is renamed to it, in the
triples and in the questions' gold. A dev set for an unseen graph's vocabulary ("birthLocation" for the place of
birth), made of training facts.

    .venv/bin/python benchmarks/make_dev_set.py runs/dev/fb15k-train-aliases 6000 0 aliases
The facts were seen in training (the adapter has no held-out train facts), so a dev score is optimistic
about retrieval; it is meant for choosing settings that the training never touched.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from atlaskv.kb.triples import read_triples
from atlaskv.train import QUESTION_TEMPLATES

REPO = Path(__file__).resolve().parents[1]

PARAPHRASES = {
    "gender": "Is {h} a man or a woman?",
    "nationality": "Which country is {h} a citizen of?",
    "place of birth": "{h} was born where?",
    "place of residence": "Where does {h} live?",
    "country of origin": "Which country does {h} come from?",
    "release medium": "On what medium was {h} released?",
    "budget currency": "In which currency was the budget of {h} counted?",
    "language": "In what language is {h}?",
    "time zone": "What time zone is {h} in?",
    "nominated work": "For which work was {h} nominated?",
    "profession": "What does {h} do for work?",
    "music composer": "Who composed the music for {h}?",
    "religion": "What faith does {h} follow?",
    "country": "Which country is {h} located in?",
    "release region": "Where was {h} released?",
    "production company": "Which company made {h}?",
    "headquarters state": "In which state does {h} have its headquarters?",
    "headquarters city": "In which city is {h} headquartered?",
    "place of death": "Where did {h} pass away?",
    "producer": "Who produced {h}?",
    "parent administrative area": "Which larger region contains {h}?",
    "screenwriter": "Who wrote the screenplay of {h}?",
    "language spoken": "Which language does {h} speak?",
    "filming location": "Where was {h} shot?",
    "place of origin": "Where did {h} originate?",
    "sport": "What sport does {h} play?",
    "spouse": "Who is {h} married to?",
    "school type": "What kind of school is {h}?",
    "cinematographer": "Who was the director of photography on {h}?",
    "executive producer": "Who was an executive producer on {h}?",
    "county": "Which county is {h} in?",
    "state": "Which state is {h} part of?",
    "story author": "Who wrote the story {h} is based on?",
    "capital": "Where is the seat of government of {h}?",
    "costume designer": "Who designed the costumes for {h}?",
    "film editor": "Who edited {h}?",
    "band": "Which band was {h} a member of?",
    "county seat": "Which town is the county seat of {h}?",
    "official language": "What language is official in {h}?",
    "production designer": "Who did the production design for {h}?",
    "prequel": "Which film came before {h}?",
    "sports team": "Which team does {h} play for?",
    "headquarters country": "In which country does {h} have its head office?",
    "employer": "Who does {h} work for?",
    "wedding location": "Where did {h} get married?",
}


def held_out_aliases() -> dict[str, str]:
    """relation -> its held-out alias (data/fb15k237-relation-aliases.tsv, split "heldout")."""
    rows = (REPO / "data" / "fb15k237-relation-aliases.tsv").read_text("utf-8").splitlines()[1:]
    return {r: a for r, a, split in (ln.split("\t") for ln in rows) if split == "heldout"}


def main(out: str, n: int = 2000, seed: int = 0, mode: str = "facts") -> None:
    triples = read_triples(REPO / "data" / "fb15k237-train.tsv").triples
    rng = np.random.default_rng(seed)
    if mode in ("by-head", "aliases"):
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
    renamed = held_out_aliases() if mode == "aliases" else {}
    with open(out_dir / "triples.tsv", "w", encoding="utf-8") as f:
        for t in picked:
            f.write(f"{t.head}\t{renamed.get(t.relation, t.relation)}\t{t.tail}\n")
    if mode in ("paraphrased", "aliases"):
        keys = Counter((t.head.casefold(), t.relation) for t in triples)
        asked = [t for t in picked if t.relation in PARAPHRASES and keys[(t.head.casefold(), t.relation)] == 1]
        with open(out_dir / "questions.jsonl", "w", encoding="utf-8") as f:
            for t in asked:
                q = PARAPHRASES[t.relation].format(h=t.head)
                f.write(json.dumps(dict(question=q[0].upper() + q[1:], head=t.head,
                                        relation=renamed.get(t.relation, t.relation), tail=t.tail)) + "\n")
        print(f"{out_dir}: {len(picked)} triples, {len(asked)} paraphrased questions, "
              f"{len(renamed)} relations renamed (seed {seed})")
        return
    with open(out_dir / "questions.jsonl", "w", encoding="utf-8") as f:
        for t in picked:
            key = f"the {t.relation} of {t.head}"
            tpl = QUESTION_TEMPLATES[rng.integers(len(QUESTION_TEMPLATES))]
            q = tpl.format(k=key, K=key[0].upper() + key[1:])
            f.write(json.dumps(dict(question=q, head=t.head, relation=t.relation, tail=t.tail)) + "\n")
    print(f"{out_dir}: {len(picked)} triples and questions from data/fb15k237-train.tsv (seed {seed})")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]), *sys.argv[4:5])
