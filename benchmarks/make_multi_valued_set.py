"""An evaluation set of multi-valued keys (issue 22 item 3): FB15k-237 (head, relation) keys with 2-5 tails, all
in the valid / test splits (no tail of the key in train.txt: the adapter never saw them), one question per key
asking for all of them. Relations are read as the evaluation sets read them (the `eval` phrases of
src/atlaskv/data/fb15k237_relations.tsv) plus the hand-written ones; names from entity2text.txt.

    .venv/bin/python benchmarks/make_multi_valued_set.py runs/eval/fb15k-multi
writes triples.tsv (every tail of every key) and questions.jsonl in the evaluation-set format ("tail": the
first value, so every question names a line of triples.tsv) plus "tails": all of them, for the reader.
Deterministic. Keys whose tails share a name, and relations the phrase table skips, are left out.
"""
import collections
import csv
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_fb15k_relations import load_names  # noqa: E402  the eval sets' name normalisation

# relations whose "What are the <plural> of X?" reads as a question with several answers
TEMPLATES = ("What are the {p} of {h}?", "Name all the {p} of {h}.", "List the {p} of {h}.")


def plural(phrase: str) -> str:
    """ "genre" -> "genres", "place of birth" -> "places of birth", "currency" -> "currencies"."""
    words = phrase.split(" of ", 1)
    w = words[0].split(" ")
    last = w[-1]
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    elif last.endswith(("s", "x", "ch", "sh")):
        last = last + "es"
    else:
        last = last + "s"
    words[0] = " ".join(w[:-1] + [last])
    return " of ".join(words)


def main(out: str, max_values: int = 5, seed: int = 0) -> None:
    shared = Path(os.environ.get("ATLASKV_SHARED") or REPO.parent / "shared") / "data" / "fb15k-237"
    names = load_names(shared)
    with open(REPO / "src/atlaskv/data/fb15k237_relations.tsv", encoding="utf-8") as f:
        phrase = {r["relation_path"]: r["phrase"] for r in csv.DictReader(f, delimiter="\t") if r["phrase"]}
    tails, in_train = collections.defaultdict(list), set()
    for split in ("train", "valid", "test"):
        for line in open(shared / f"{split}.txt", encoding="utf-8"):
            h, r, t = line.rstrip("\n").split("\t")
            if split == "train":
                in_train.add((h, r))
            elif t not in tails[(h, r)]:
                tails[(h, r)].append(t)
    rng = random.Random(seed)
    questions, triples = [], []
    for (h, r), ts in sorted(tails.items()):
        if (h, r) in in_train or not 2 <= len(ts) <= max_values or r not in phrase:
            continue
        vals = [names[t] for t in ts]
        if len({v.casefold() for v in vals}) < len(vals) or names[h].casefold() in {v.casefold() for v in vals}:
            continue
        q = rng.choice(TEMPLATES).format(p=plural(phrase[r]), h=names[h]).replace("..", ".")
        questions.append({"question": q, "head": names[h], "relation": phrase[r], "tail": vals[0], "tails": vals})
        triples += [(names[h], phrase[r], v) for v in vals]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "triples.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{h}\t{r}\t{t}\n" for h, r, t in triples)
    with open(out_dir / "questions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    by_n = collections.Counter(len(q["tails"]) for q in questions)
    print(f"{out_dir}: {len(questions)} keys, {len(triples)} triples; values per key {dict(sorted(by_n.items()))}; "
          f"relations {len({q['relation'] for q in questions})}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
