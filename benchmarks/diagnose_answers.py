"""Which stage fails when an answer is wrong: finding the fact (grounding) or saying it (answer)?

For the questions `atlaskv eval grounding` answers (same seed, KBs and order; flat attention), writes one
JSONL row per question: the greedy answer, the gold tail, and the tail of the triple the KB attention
ranks first, and the KB value the answer names first. A wrong answer whose top-attended triple is the gold
one failed at the answer stage; `gold_named_first` counts answers whose first KB value named is the gold
one (stricter than answer EM, which only asks that the gold tail appears).

    .venv/bin/python benchmarks/diagnose_answers.py --set ../shared/eval/fb15k --size 100 --questions 100
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from atlaskv.kb.encoder import load_encoder
from atlaskv.evaluation.grounding import ask_batch
from atlaskv.evaluation.metrics import contains_answer, first_named
from atlaskv.evaluation.pool import kb_chunks, load_pool
from atlaskv.kb.view import KBView
from atlaskv.model.atlaskv import AtlasKV


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", required=True)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--distractors", default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one)")
    ap.add_argument("--out", default=None, help="JSONL (default benchmarks/results/answer_stage/<set>_<size>.jsonl)")
    args = ap.parse_args()
    akv = AtlasKV.from_pretrained(args.adapter)
    enc = load_encoder(akv.adapter.config.encoder)
    pool = load_pool(args.set, enc)
    qidx = np.random.default_rng(args.seed).permutation(len(pool.questions))[:args.questions]
    size = min(args.size, len(pool.triples))
    rows_out = []
    for qs, rows in kb_chunks(pool, qidx, size, args.distractors, np.random.default_rng([args.seed, size])):
        view = KBView.from_arrays(pool.keys[rows].astype(np.float32), pool.values[rows].astype(np.float32),
                                  [pool.triples[r] for r in rows])
        tails = sorted({pool.triples[r].tail for r in rows})
        for s in range(0, len(qs), 16):
            bq = [pool.questions[q] for q in qs[s:s + 16]]
            texts = [q.question for q in bq]
            qemb = torch.from_numpy(enc.encode(texts))
            answers, kb, mask = ask_batch(akv, texts, view, 32, True, None, qemb)[:3]
            for q, a, (pos, w) in zip(bq, answers, kb.summed_attention(mask)):
                top = pool.triples[rows[int(pos[0])]]
                rows_out.append({"question": q.question, "gold": q.tail, "answer": a.strip(),
                                 "correct": contains_answer(a, q.tail), "top_attended_tail": top.tail,
                                 "top_is_gold": top == q.triple, "top_share": round(float(w[0] / w.sum()), 4),
                                 "first_named_tail": first_named(a, tails)})
    out = Path(args.out or f"benchmarks/results/answer_stage/{Path(args.set).name}_{size}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows_out))
    wrong = [r for r in rows_out if not r["correct"]]
    summary = {"set": Path(args.set).name, "kb_size": size, "questions": len(rows_out),
               "correct": len(rows_out) - len(wrong), "wrong": len(wrong),
               "gold_named_first": sum(r["first_named_tail"] == r["gold"] for r in rows_out),
               "wrong_with_gold_ranked_first": sum(r["top_is_gold"] for r in wrong),
               "wrong_tail_named_in_answer": sum(contains_answer(r["answer"], r["top_attended_tail"]) for r in wrong)}
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
