"""A refusal signal tried and not adopted: does the sentence encoder match the question to another relation of the
KB better than to the cited fact's? Scored on saved answers (eval grounding --save-answers), nothing re-decoded.

For each answer whose question names the top fact's head: the question with that head replaced by "X" against
every relation template of the set's KB ("the place of residence of X"); margin = best template's cosine minus
the cited relation's. "all": every relation is a rival; "unlike<k>": only relations whose template's cosine
with the cited one's is under k. Refusing at margin > t is added to the shipped v4 rule (head, or support
< REFUSE_BELOW and the value unnamed), and the refused shares are reported.

    .venv/bin/python benchmarks/relation_match.py benchmarks/results/refusal_v4/*.jsonl \
        --json benchmarks/results/refusal_v4/relation_match.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np

from atlaskv.defaults import REFUSE_BELOW
from atlaskv.kb.encoder import load_encoder
from atlaskv.kb.records import RelationNouns
from atlaskv.kb.triples import read_triples
from atlaskv.model.refusal import names_value

EVAL = Path(os.environ.get("ATLASKV_SHARED", "../shared")) / "eval"
TRIPLES = {"fb15k-para": EVAL / "fb15k-para/triples.tsv", "pararel": EVAL / "pararel/triples.tsv",
           "webnlg": Path("runs/eval/webnlg/triples.tsv"), "fb15k-train-para": Path("runs/dev/fb15k-train-para/triples.tsv"),
           "fb15k-train-6k": Path("runs/dev/fb15k-train-6k/triples.tsv"),
           "fb15k-train-heads": Path("runs/dev/fb15k-train-heads/triples.tsv")}
VARIANTS = ("all", "unlike0.5", "unlike0.6", "unlike0.7", "unlike0.8")
MARGINS = (0.02, 0.05, 0.08, 0.1, 0.15)


def auroc(pos, neg) -> float | None:
    pos, neg = np.asarray(pos), np.asarray(neg)
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("answers", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args()
    enc, nouns, cache = load_encoder(), RelationNouns(), {}

    def emb(texts):
        miss = [t for t in dict.fromkeys(texts) if t not in cache]
        if miss:
            cache.update(zip(miss, enc.encode(miss, batch_size=128, show_progress=False)))
        return np.stack([cache[t] for t in texts])

    out = {}
    for f in a.answers:
        rows = [json.loads(line) for line in Path(f).read_text("utf-8").splitlines()]
        rels = sorted({t.relation for t in read_triples(TRIPLES[rows[0]["set"]]).triples})
        names = list(rels)
        base, scored = {True: [0, 0], False: [0, 0]}, []
        for r in rows:
            for answerable, sig, answer in ((True, r["signals"], r["answer"]),
                                            (False, r["signals_without_gold"], r["answer_without_gold"])):
                sig = sig or {}
                top = sig.get("top_citation")
                sup = float("inf") if sig.get("support") is None else sig["support"]
                refused = not top or not sig["head_named"] or (sup < REFUSE_BELOW and not names_value(answer or "", top[2]))
                base[answerable][0] += refused
                base[answerable][1] += 1
                if refused:
                    continue
                head, rel = top[0], top[1]
                if rel not in names:
                    names.append(rel)
                templates = [nouns.template(x, "tail").replace("{entity}", "X") for x in names]
                q = emb([re.compile(re.escape(head), re.I).sub("X", r["question"])])[0]
                t = emb(templates)
                s, i = t @ q, names.index(rel)
                like = t @ t[i]
                m = {"all": float(s.max() - s[i])}
                for k in (0.5, 0.6, 0.7, 0.8):
                    m[f"unlike{k}"] = float(np.where(like < k, s, -9).max() - s[i])
                scored.append({"answerable": answerable, **m})
        res = {"answerable_refused_v4": base[True][0] / base[True][1],
               "unanswerable_refused_v4": base[False][0] / max(1, base[False][1])}
        for v in VARIANTS:
            res[v] = {"auroc_among_head_named": auroc([x[v] for x in scored if not x["answerable"]],
                                                      [x[v] for x in scored if x["answerable"]])}
            for t in MARGINS:
                add = {b: sum(x[v] > t for x in scored if x["answerable"] is b) for b in (True, False)}
                res[v][f"margin>{t}"] = [round((base[True][0] + add[True]) / base[True][1], 3),
                                         round((base[False][0] + add[False]) / max(1, base[False][1]), 3)]
        out[Path(f).stem] = res
        print(Path(f).stem, json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps({"what": "relation-match refusal on saved answers (not adopted); "
                                            "per variant and margin: [answerable refused, unanswerable refused]",
                                            "results": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
