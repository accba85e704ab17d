"""Other names for FB15k-237's relations, for training (`atlaskv train --relation-aliases`).

    .venv/bin/python scripts/make_relation_aliases.py
    # data/fb15k237-relation-aliases-written.tsv -> data/fb15k237-relation-aliases.tsv (relation, alias, split)

Users' graphs name their relations their own way ("birthPlace", "cityServed", "place_of_birth"); the adapter
learned 189 names, and on names it never saw its KB attention ranks an entity's keys erratically (docs/results.md,
refusal v6). `fb15k237-relation-aliases-written.tsv` holds 4 other names per training relation (camelCase,
snake_case, two plain rewordings), written by an agent given only the relation names and two training facts each,
never an evaluation set. Kept apart here:
- decontamination: an alias whose key template is that of a relation of an evaluation graph (WebNLG's DBpedia
  properties, ParaRel's Wikidata labels, the fb15k sets' names) is dropped, so those graphs stay unseen; so is
  one that reads like another training relation (it would teach the adapter to confuse the two);
- one surviving alias per relation is held out ("heldout", seeded), for a dev set of training facts under relation
  names training never used (benchmarks/make_dev_set.py ... aliases).
`atlaskv train --relation-aliases data/fb15k237-relation-aliases.tsv` renames a share of each relation's facts
to its "train" aliases (train/data.py). Deterministic.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from make_fb15k_relations import REPO, shared_dir  # noqa: E402
from make_webnlg_set import read_triples as webnlg_triples  # noqa: E402

from atlaskv.kb.records import RelationNouns  # noqa: E402
from atlaskv.kb.triples import read_triples  # noqa: E402

WRITTEN = REPO / "data" / "fb15k237-relation-aliases-written.tsv"
ALIASES = REPO / "data" / "fb15k237-relation-aliases.tsv"
TRAIN = REPO / "data" / "fb15k237-train.tsv"
SEED = 0


def eval_relations() -> set[str]:
    """Every relation name of the evaluation graphs: the sets in ../shared/eval, all of WebNLG 3.0's properties
    and ParaRel's relation labels."""
    shared = shared_dir()
    names: set[str] = set()
    for tsv in sorted((shared / "eval").glob("*/triples.tsv")):
        names |= {ln.split("\t")[1] for ln in tsv.read_text("utf-8").splitlines() if ln.count("\t") >= 2}
    names |= {r for _, r, _ in webnlg_triples(shared / "data" / "webnlg-3.0-en")}
    for ln in (shared / "data" / "pararel-trex" / "lama_relations.jsonl").read_text("utf-8").splitlines():
        names.add(json.loads(ln)["label"])
    return names


def squash(name: str) -> str:
    return "".join(c for c in name.casefold() if c.isalnum())


def main() -> None:
    nouns = RelationNouns()
    key = lambda r: nouns.template(r, "tail").casefold()  # noqa: E731
    triples = read_triples(TRAIN).triples
    trained = sorted({t.relation for t in triples})
    held_keys = {key(r) for r in eval_relations()}
    held_names = {squash(r) for r in eval_relations()}
    own_keys = {key(r): r for r in trained}
    rows = [ln.split("\t") for ln in WRITTEN.read_text("utf-8").splitlines()[1:] if ln.strip()]
    unknown = sorted({r for r, _ in rows} - set(trained))
    if unknown:
        raise SystemExit(f"{WRITTEN}: relations not in {TRAIN.name}: {unknown[:5]}")
    kept: dict[str, list[str]] = {}
    dropped = Counter()
    taken: dict[str, str] = {}  # alias key -> its relation
    for rel, alias in rows:
        k = key(alias)
        if k in held_keys or squash(alias) in held_names:
            dropped["an evaluation graph's relation"] += 1
        elif k in own_keys:  # the relation's own template, or another training relation's
            dropped["a training relation's key" if own_keys[k] != rel else "the relation's own key"] += 1
        elif k in taken:
            dropped["the same key as another alias" if taken[k] == rel else "another relation's alias"] += 1
        else:
            kept.setdefault(rel, []).append(alias)
            taken[k] = rel
    rng = np.random.default_rng(SEED)
    split = {}
    for rel in trained:
        names = kept.get(rel, [])
        out = int(rng.integers(len(names))) if len(names) >= 2 else -1  # keep at least one to train on
        for i, a in enumerate(names):
            split[(rel, a)] = "heldout" if i == out else "train"
    ALIASES.write_text("relation\talias\tsplit\n" + "".join(f"{r}\t{a}\t{split[(r, a)]}\n" for r in trained
                                                          for a in kept.get(r, [])), encoding="utf-8")

    n_train = sum(1 for s in split.values() if s == "train")
    print(f"{ALIASES}: {sum(len(v) for v in kept.values())} of {len(rows)} aliases kept ({n_train} train, "
          f"{sum(1 for s in split.values() if s == 'heldout')} held out); dropped: {dict(dropped)}")


if __name__ == "__main__":
    main()
