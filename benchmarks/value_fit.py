"""Does the backing fact's value (and relation) fit the question? A refusal signal that was tried and not adopted:
a small MLP over sentence embeddings (all-MiniLM-L6-v2) of the question with its entity masked as "X", the value
and, in the "kv" variant, the relation's key ("the place of birth of X"), trained on training facts whose heads
no dev set asks about (positive: a fact's own value; negatives: another value of the same entity, a random fact's
value). Questions: the training templates with the relation's name or one of its training aliases, or a training
phrasing (data/fb15k237-phrasings.tsv). Scored on saved answers (eval grounding --save-answers) as the shipped
rule or "fit under a threshold", the threshold picked on the dev sets as refusal_rules.calibrate does.

    python benchmarks/value_fit.py --variant v --calibrate DEV.jsonl ... --score EVAL.jsonl ... [--json out.json]

Run from the repository root (reads data/ and runs/dev/). Seeded; a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from refusal_rules import calibrate, lacking, load, refusal_scores, shipped_v5

from atlaskv.defaults import LACKING_RATIO
from atlaskv.kb.encoder import load_encoder
from atlaskv.kb.records import ENTITY, RelationNouns
from atlaskv.kb.triples import Triple, read_triples
from atlaskv.model.refusal import backing
from atlaskv.train import QUESTION_TEMPLATES

NOUNS = RelationNouns()


def masked(question: str, head: str) -> str:
    return re.sub(re.escape(head), "X", question, flags=re.I)


def key_of(relation: str) -> str:
    return NOUNS.template(relation, "tail").replace(ENTITY, "X")


def training_pairs(seed: int = 0) -> list[tuple[str, str, str, int]]:
    """(masked question, key, value, label) from the training facts of heads no dev set asks about."""
    rng = random.Random(seed)
    dev_heads = {q["head"] for d in Path("runs/dev").iterdir()
                 for q in map(json.loads, (d / "questions.jsonl").open(encoding="utf-8"))}
    facts = [t for t in read_triples("data/fb15k237-train.tsv").triples if t.head not in dev_heads]
    phrasings, aliases, by_head = {}, {}, {}
    for line in Path("data/fb15k237-phrasings.tsv").read_text("utf-8").splitlines()[1:]:
        r, q = line.split("\t")
        phrasings.setdefault(r, []).append(q)
    for line in Path("data/fb15k237-relation-aliases.tsv").read_text("utf-8").splitlines()[1:]:
        r, a, split = line.split("\t")
        if split == "train":
            aliases.setdefault(r, []).append(a)
    for t in facts:
        by_head.setdefault(t.head, []).append(t)
    pairs = []
    for t in facts:
        u, r = rng.random(), t.relation
        if u < 0.4 and phrasings.get(r):
            q = rng.choice(phrasings[r]).replace("{head}", "X")
        else:
            k = key_of(r if u < 0.7 or not aliases.get(r) else rng.choice(aliases[r]))
            q = rng.choice(QUESTION_TEMPLATES).replace("{k}", k).replace("{K}", k[0].upper() + k[1:])
        pairs.append((q, key_of(r), t.tail, 1))
        others = [o for o in by_head[t.head] if o.tail != t.tail and o.relation != r]
        if others:
            o = rng.choice(others)
            pairs.append((q, key_of(o.relation), o.tail, 0))
        o = rng.choice(facts)
        if o.relation != r:
            pairs.append((q, key_of(o.relation), o.tail, 0))
    return pairs


def features(q, k, v, variant: str) -> torch.Tensor:
    return torch.cat([q, v, q * v] + ([k, q * k] if variant == "kv" else []), -1)


def embed(texts: list[str]) -> dict[str, torch.Tensor]:
    texts = sorted(set(texts))
    e = torch.tensor(load_encoder().encode(texts, batch_size=256))
    return {t: e[i] for i, t in enumerate(texts)}


def train(variant: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    pairs = training_pairs(seed)
    e = embed([x for p in pairs for x in p[:3]])
    X = features(*(torch.stack([e[p[i]] for p in pairs]) for i in range(3)), variant)
    y = torch.tensor([float(p[3]) for p in pairs])
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 256), torch.nn.GELU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(8):
        for b in torch.randperm(len(y)).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(X[b]).squeeze(-1), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def score(net, rows: list[dict], variant: str) -> None:
    """Sets row["fit"]: the logit that the backing fact's value answers the question (None: nothing backs one)."""
    todo = []
    for r in rows:
        r["fit"] = None
        if r.get("top_citation") and r.get("cited"):
            cited = [(Triple(*t), 1.0) for t in r["cited"]]
            at = backing(r["question"], cited)
            if at is not None:
                f = cited[at][0]
                todo.append((r, masked(r["question"], f.head), key_of(f.relation), f.tail))
    if not todo:
        return
    e = embed([x for t in todo for x in t[1:]])
    with torch.no_grad():
        X = features(*(torch.stack([e[t[i]] for t in todo]) for i in (1, 2, 3)), variant)
        for (r, *_), s in zip(todo, net(X).squeeze(-1).tolist()):
            r["fit"] = s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("v", "kv"), default="v")
    ap.add_argument("--calibrate", nargs="+", required=True, help="saved answers of the dev sets")
    ap.add_argument("--score", nargs="+", required=True, help="saved answers to score")
    ap.add_argument("--kb-size", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args()
    net = train(args.variant)
    fit = lambda r: 99.0 if r["fit"] is None else r["fit"]  # noqa: E731
    shipped = lambda r: shipped_v5(r) or lacking(r) >= LACKING_RATIO  # noqa: E731
    rows = {p: [r for r in load([p]) if r["key"][1] == args.kb_size] for p in args.calibrate + args.score}
    for p in rows:
        score(net, rows[p], args.variant)
    dev = [r for p in args.calibrate for r in rows[p]]
    t = calibrate(dev, lambda r, t: shipped(r) or fit(r) < t, fit, 0.03)
    out = {"variant": args.variant, "threshold": t, "kb_size": args.kb_size, "sets": {}}
    for p, rs in rows.items():
        a = refusal_scores(rs, shipped)
        b = refusal_scores(rs, lambda r: shipped(r) or fit(r) < (t if t is not None else -99))
        out["sets"][p] = {"shipped": a, "shipped_or_fit": b}
        print(f"{p}: answerable / unanswerable refused, shipped {a['refused_answerable']:.3f} / "
              f"{a['refused_unanswerable']:.3f}, or fit < {t}: {b['refused_answerable']:.3f} / {b['refused_unanswerable']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
