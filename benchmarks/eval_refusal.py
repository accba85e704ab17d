"""Does the model say so when the KB has no fitting fact? Refusal precision / recall and answer exact-match.

The KB holds every fact of an evaluation set (shared/eval/fb15k: 5,887), or, for a smaller KB, every asked
question's facts plus random others. Each question is asked twice through the public API (AtlasKV.ask):
with its fact present, and with it removed live from the KB (every
fact with the same head and relation, so no sibling answers it), then the fact is added back.
A refusal is a positive; it is correct when the fact was removed. Refusal rules compared:
  trained    the answer text is the adapter's trained refusal ("I don't know.")
  top_weight the most-cited fact holds less than a threshold of the KB attention (Answer.citations[0])
  top_ratio  the most-cited fact holds less than a threshold times the weight of the second one
  kb_mass    less than a threshold of the prompt's attention went to the KB (Answer.kb_attention_mass)
Thresholds are calibrated (best refusal F1) on separate questions, then applied unchanged to the test
questions (and, to see how they transfer, at the other KB size). answer_em: the gold tail appears in the
answer (evaluate.contains_answer); refusals count as wrong.

    .venv/bin/python benchmarks/eval_refusal.py --set ../shared/eval/fb15k --questions 200 --calibration 100 \
        --sizes all,500
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from atlaskv.evaluation.metrics import contains_answer, names_exactly, normalize
from atlaskv.kb.triples import read_eval_set
from atlaskv.model.atlaskv import AtlasKV
from atlaskv.kb.store import KnowledgeBase
from atlaskv.defaults import REFUSAL, REFUSE_BELOW


def is_refusal_text(text: str) -> bool:
    return normalize(REFUSAL) in normalize(text) or "don t know" in normalize(text)


def value_support(citations) -> float:
    """The cited facts that name the top-cited value, summed, over the heaviest one naming another value."""
    if not citations:
        return 0.0
    top = normalize(citations[0][0].tail)
    same = sum(w for t, w in citations if normalize(t.tail) == top)
    other = max([w for t, w in citations if normalize(t.tail) != top], default=0.0)
    return same / other if other > 0 else 1e9


def run_questions(akv, kb, questions, by_key, max_new_tokens, log, prune=False):
    from atlaskv.kb.encoder import load_encoder

    enc = load_encoder(akv.adapter.config.encoder)
    rows = []
    for i, q in enumerate(questions):
        group = by_key[(q.head, q.relation)]
        for cond in ("present", "removed"):
            if cond == "removed":
                kb.remove(group)
            ans = akv.ask(q.question, kb, max_new_tokens=max_new_tokens, prune=prune)
            top = ans.citations[0][0] if ans.citations else None
            qe, ke = enc.encode([q.question, f"the {top.relation} of {top.head}" if top else ""])
            rows.append({"question": q.question, "gold": q.tail, "condition": cond, "answer": ans.text,
                         "top_citation": list(top) if top else None,
                         "value_support": value_support(ans.citations),
                         "head_named": float(bool(top) and contains_answer(q.question, top.head)),
                         "names_top_value": float(bool(top) and names_exactly(ans.text, top.tail)),
                         "key_cosine": float(qe @ ke / (np.linalg.norm(qe) * np.linalg.norm(ke) + 1e-12)),
                         "em": contains_answer(ans.text, q.tail), "trained_refusal": is_refusal_text(ans.text),
                         "top_weight": ans.citations[0][1] if ans.citations else 0.0,
                         "top_ratio": ans.citations[0][1] / ans.citations[1][1] if len(ans.citations) > 1 else 1e9,
                         "top_is_gold": bool(ans.citations) and tuple(ans.citations[0][0]) == tuple(q.triple),
                         "kb_mass": ans.kb_attention_mass})
        kb.add(group)
        if (i + 1) % 25 == 0:
            kb.compact()  # live updates add a segment each; keep reads cheap
            log(f"{i + 1}/{len(questions)}")
    return rows


def scores(rows, refuse) -> dict:
    """Refusal precision/recall (positive = refused; correct when the fact was removed) and answer EM."""
    pos = np.array([refuse(r) for r in rows])
    removed = np.array([r["condition"] == "removed" for r in rows])
    tp = int((pos & removed).sum())
    prec = tp / pos.sum() if pos.sum() else None
    rec = tp / removed.sum()
    present = ~removed
    em = np.array([r["em"] for r in rows]) & ~pos
    return {"refusal_precision": prec, "refusal_recall": rec,
            "refusal_f1": (2 * prec * rec / (prec + rec)) if prec and rec else 0.0,
            "false_refusals_when_present": float(pos[present].mean()),
            "answer_em_present": float(em[present].mean()),
            "answer_em_removed": float(em[removed].mean()),
            "wrong_answers_when_removed": float((~pos[removed]).mean())}


def calibrate(rows, key) -> float:
    """The threshold (refuse below it) with the best refusal F1 on these rows."""
    vals = sorted({r[key] for r in rows})
    cands = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    return max(cands, key=lambda t: scores(rows, lambda r: r[key] < t)["refusal_f1"])


def calibrate_capped(rows, refuse, key, max_false: float = 0.03) -> float:
    """The threshold of `refuse(row, t)` that refuses the most removed-fact questions while refusing at most
    `max_false` of the answerable ones (0: the rule's other part alone)."""
    vals = sorted({r[key] for r in rows if r[key] < 1e8})
    best, best_rec = 0.0, -1.0
    for t in [0.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:])]:
        sc = scores(rows, lambda r: refuse(r, t))
        if sc["false_refusals_when_present"] <= max_false and sc["refusal_recall"] > best_rec:
            best, best_rec = t, sc["refusal_recall"]
    return best


def auroc(rows, key) -> float:
    """P(signal of a present-fact question > signal of a removed-fact one): how well it separates them."""
    a = np.array([r[key] for r in rows if r["condition"] == "present"])
    b = np.array([r[key] for r in rows if r["condition"] == "removed"])
    return float(((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (len(a) * len(b)))


SIGNALS = ("top_weight", "top_ratio", "kb_mass", "value_support", "key_cosine")


def evaluate_size(akv, kb, calib, test, by_key, args, log, fixed: dict | None = None):
    cal_rows = run_questions(akv, kb, calib, by_key, args.max_new_tokens, log, args.prune)
    test_rows = run_questions(akv, kb, test, by_key, args.max_new_tokens, log, args.prune)
    thresholds = {k: calibrate(cal_rows, k) for k in SIGNALS}

    # value-aware rules (issue 22): the cited facts that name the top value support it; a top-cited fact about
    # another head (the question does not name it) backs nothing. Thresholds: the most refusals of removed
    # facts with at most 3 % of answerable questions refused, on the calibration questions.
    vs = calibrate_capped(cal_rows, lambda r, t: r["value_support"] < t, "value_support")
    hs = calibrate_capped(cal_rows, lambda r, t: r["head_named"] < 1 or r["value_support"] < t, "value_support")
    thresholds.update({"value_support_capped": vs, "head_or_value_support": hs})

    def rules(th):
        return {"trained": lambda r: r["trained_refusal"],
                **{k: (lambda r, k=k: r[k] < th[k]) for k in SIGNALS},
                "value_support_capped": lambda r: r["value_support"] < th["value_support_capped"],
                "head_not_named": lambda r: r["head_named"] < 1,
                "top_ratio_below_%s" % REFUSE_BELOW: lambda r: r["top_ratio"] < REFUSE_BELOW,
                "head_or_value_support": lambda r: r["head_named"] < 1 or r["value_support"] < th["head_or_value_support"]}

    def table(th):
        return {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores(test_rows, f).items()}
                for name, f in rules(th).items()}

    present = [r for r in test_rows if r["condition"] == "present"]
    out = {
        "kb_size": len(kb),
        "answer_em_present_no_refusal": float(np.mean([r["em"] for r in present])),
        "answer_em_removed_no_refusal": float(np.mean([r["em"] for r in test_rows if r["condition"] == "removed"])),
        "top_citation_is_gold_present": float(np.mean([r["top_is_gold"] for r in present])),
        "thresholds": {k: round(v, 4) for k, v in thresholds.items()},
        "auroc": {k: round(auroc(test_rows, k), 4) for k in SIGNALS},
        "rules": table(thresholds),
    }
    if fixed:  # the thresholds calibrated on the other KB size, applied here unchanged
        out["rules_with_thresholds_of_kb_size_%d" % fixed["kb_size"]] = table(fixed["thresholds"])
    return out, cal_rows + test_rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="../shared/eval/fb15k")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument("--sizes", default="all,500", help="KB sizes: 'all' (the whole set) and/or numbers.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--prune", action="store_true", help="HiKVP-pruned attention (default: flat, every entry).")
    ap.add_argument("--kb-dir", default="build/refusal_kb")
    ap.add_argument("--json", default="benchmarks/results/refusal_fb15k.json")
    ap.add_argument("--details", default=None, help="Also write every answer (JSONL) here.")
    args = ap.parse_args()
    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", flush=True)

    triples, questions = read_eval_set(args.set)
    by_key: dict = {}
    for t in triples:
        by_key.setdefault((t.head, t.relation), []).append(t)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(questions))
    calib = [questions[i] for i in order[:args.calibration]]
    test = [questions[i] for i in order[args.calibration:args.calibration + args.questions]]
    # a smaller KB: every asked question's facts, then random others of the set
    asked = list(dict.fromkeys(t for q in calib + test for t in by_key[(q.head, q.relation)]))
    known = set(asked)
    others = [triples[i] for i in rng.permutation(len(triples)) if triples[i] not in known]
    akv = AtlasKV.from_pretrained(args.adapter)
    results, details = [], []
    for size in args.sizes.split(","):
        n = len(triples) if size == "all" else max(int(size), len(asked))
        kb = KnowledgeBase.build(asked + others[:n - len(asked)], args.kb_dir, overwrite=True)
        log(f"KB of {len(kb)} facts; {len(calib)} calibration + {len(test)} test questions, each present and removed")
        res, rows = evaluate_size(akv, kb, calib, test, by_key, args, log, fixed=results[0] if results else None)
        results.append(res)
        details += [{**r, "kb_size": len(kb)} for r in rows]
    out = {"set": Path(args.set).name, "n_questions": len(test), "n_calibration": len(calib), "seed": args.seed,
           "max_new_tokens": args.max_new_tokens, "pruned": args.prune, "adapter": args.adapter or "default",
           "refusal_text": REFUSAL,
           "signals": {"top_weight": "share of the KB attention on the most-cited fact (Answer.citations[0])",
                       "top_ratio": "its weight over the second-cited fact's",
                       "kb_mass": "Answer.kb_attention_mass"},
           "results": results, "seconds": round(time.time() - t0, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.details:
        with open(args.details, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in details)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
