"""Readable FB15k-237 *train-split* triples for training the default adapter.

    .venv/bin/python scripts/make_training_data.py      # writes data/fb15k237-train.tsv

Keeps a fact when its readable key (head name, relation phrase), compared case-insensitively, has exactly
one tail in the whole graph (train + valid + test), so "the <phrase> of <head>" names one answer; drops
any fact whose readable form is a valid/test fact, and every key asked by an evaluation set in
../shared/eval (fb15k, fb15k-dense, fb15k-para hold questions about valid/test facts only, but a name
collision could still map a train fact onto an evaluated key). Deterministic.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fb15k_relations import REPO, load_names, shared_dir  # noqa: E402

OUT = REPO / "data" / "fb15k237-train.tsv"
# degenerate relations (one tail for nearly every head: "Official Website", "Marriage"): nothing to retrieve
SKIP_PHRASES = {"webpage category", "type of union"}


def main() -> None:
    shared = shared_dir()
    data = shared / "data" / "fb15k-237"
    phrases = {}
    with open(REPO / "src/atlaskv/data/fb15k237_relations.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            path, phrase, *_ = line.rstrip("\n").split("\t")
            phrases[path] = phrase
    names = load_names(data)
    splits = {}
    for split in ("train", "valid", "test"):
        with open(data / f"{split}.txt", encoding="utf-8") as f:
            splits[split] = [tuple(l.rstrip("\r\n").split("\t")) for l in f if l.strip()]
    readable = {s: [(names[h], phrases[r], names[t]) for h, r, t in rows] for s, rows in splits.items()}
    tails = collections.defaultdict(set)
    for rows in readable.values():
        for h, p, t in rows:
            tails[(h.casefold(), p.casefold())].add(t.casefold())
    held_out = set(readable["valid"]) | set(readable["test"])
    eval_keys = set()
    for name in ("fb15k", "fb15k-dense", "fb15k-para"):
        import json

        with open(shared / "eval" / name / "questions.jsonl", encoding="utf-8") as f:
            for line in f:
                q = json.loads(line)
                eval_keys.add((q["head"].casefold(), q["relation"].casefold()))
    seen, out = set(), []
    for h, p, t in readable["train"]:
        key = (h.casefold(), p.casefold())
        if not h or not t or h.casefold() == t.casefold() or len(tails[key]) != 1 or p in SKIP_PHRASES:
            continue
        if (h, p, t) in held_out or key in eval_keys or (h, p, t) in seen:
            continue
        seen.add((h, p, t))
        out.append((h, p, t))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.writelines(f"{h}\t{p}\t{t}\n" for h, p, t in out)
    rels = collections.Counter(p for _, p, _ in out)
    print(f"{len(out):,} triples, {len(rels)} relations, {len({h for h, _, _ in out}):,} heads -> {OUT}")
    print("top relations:", rels.most_common(12))


if __name__ == "__main__":
    main()
