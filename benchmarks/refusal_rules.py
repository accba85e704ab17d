"""Refusal rules scored on saved answers (eval grounding --save-answers): each answered question once with its
gold fact in the KB (answerable: a refusal is wrong) and once without it (a refusal is right). The thresholds
are picked on the calibration files (dev sets of training facts): the most refusals without the gold fact
while refusing at most --max-false of the answerable questions; then the same thresholds score every other
file, per KB size. Nothing here runs a model.

    bash benchmarks/run_refusal_signals.sh   # the dev sets' answers (calibration)
    .venv/bin/python benchmarks/refusal_rules.py --calibrate benchmarks/results/refusal_v3/dev_*.jsonl \
        --score benchmarks/results/refusal_v3/pararel_1000.jsonl benchmarks/results/refusal_v3/fb15k-para_1000.jsonl \
        --json benchmarks/results/refusal_v3/rules.json
    # the answers of the shipped decoding (a rule that reads the answer: "head or (support and not named)")
    .venv/bin/python benchmarks/refusal_rules.py --calibrate benchmarks/results/answer_targets/dev_*.jsonl \
        --score benchmarks/results/answer_targets/atlaskv_*.jsonl --json benchmarks/results/answer_targets/refusal_rules.json
The answers were decoded with the shipped rule's trust guards (model/decoding.py), so a rule that reads the
answer is scored on answers its own guards did not shape.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from atlaskv.defaults import REFUSE_BELOW
from atlaskv.kb.triples import Triple
from atlaskv.model.refusal import backing, names_value


def load(paths: list[str]) -> list[dict]:
    """Rows of signals: the answer's with the gold fact (answerable), and without it (unanswerable; an empty
    signals dict when no KB was left: refused)."""
    out = []
    for p in paths:
        for line in Path(p).read_text("utf-8").splitlines():
            r = json.loads(line)
            if "signals" not in r:
                raise SystemExit(f"{p}: answers saved before the refusal signals were (rerun eval grounding)")
            key = (r["set"], r["kb_size"])
            for answerable, signals, answer, exact in (
                    (True, r["signals"], r.get("answer"), r.get("exact")),
                    (False, r["signals_without_gold"], r.get("answer_without_gold"), r.get("exact_without_gold"))):
                signals = signals or {}
                top = signals.get("top_citation")
                out.append({"key": key, "answerable": answerable, **signals, "exact": bool(exact),
                            "names_top": bool(top and answer and _named(top[2], answer)),
                            "question": r["question"], "answer": answer or ""})
    return out


def _named(value: str, answer: str) -> bool:
    """The answer names the value as a whole (its words in a row): the shipped rule's own test."""
    return names_value(answer, value)


def value_logprob(r: dict) -> float:
    """The model's own log-prob of the top value's first token before value decoding pushed it (-1e9: none)."""
    return -1e9 if r.get("value_logprob") is None else r["value_logprob"]


def shipped(r: dict) -> bool:
    return not r.get("head_named") or (support(r) < REFUSE_BELOW and not r.get("names_top"))


def cosine(r: dict) -> float:
    return r["key_cosine"][0] if r.get("key_cosine") else -1.0


def support(r: dict) -> float:
    return 1e9 if r.get("support") is None else r["support"]


def shipped_v5(r: dict) -> bool:
    """The rule of refusal v5 (model/refusal.py without the lacking keys), from the saved citations: refuse when
    no cited fact backs an answer; when the top one does and its support is under REFUSE_BELOW, or a later one
    does, refuse unless the answer names the backing fact's value."""
    if not r.get("top_citation"):
        return True
    cited = [(Triple(*t), 1.0) for t in r["cited"]]
    at = backing(r["question"], cited)
    if at is None:
        return True
    if at == 0 and support(r) >= REFUSE_BELOW:
        return False
    return not names_value(r["answer"], cited[at][0].tail)


def lacking(r: dict, name: str = "lacking") -> float:
    """The lacking-key ratio (probes.py; 0 when nothing backs an answer or nothing lacks)."""
    lk = r.get(name)
    return 0.0 if not lk else lk["ratio"]


# rule name -> (refuses(row, threshold), the signal its threshold is taken from)
RULES = {
    # refusal v6 (2026-12-07): v5, or a fact the KB lacks about the entity draws the question more than the
    # backing one (the signal negated: calibrate() refuses below a threshold)
    "v5 (shipped before)": (lambda r, t: shipped_v5(r), support),
    "v5 or lacking key": (lambda r, t: shipped_v5(r) or -lacking(r) < t, lambda r: -lacking(r)),
    # ... comparing every relation, also those the adapter was never trained on (not shipped)
    "v5 or lacking key (every relation)": (lambda r, t: shipped_v5(r) or -lacking(r, "lacking_every_relation") < t,
                                           lambda r: -lacking(r, "lacking_every_relation")),
    "lacking key only": (lambda r, t: -lacking(r) < t, lambda r: -lacking(r)),
    "head or support < 2.27 (before)": (lambda r, t: not r.get("head_named") or support(r) < 2.27, support),
    "head or support (v2, calibrated: shipped)": (lambda r, t: not r.get("head_named") or support(r) < t, support),
    # the prefill-only rule as it shipped until the rule read the answer (2026-12-07)
    "head or support < 1.86 (shipped before)": (lambda r, t: not r.get("head_named") or support(r) < 1.86, support),
    "head or (support and not named)": (  # issue 22's "an answer naming the top value is not refused for support"
        lambda r, t: not r.get("head_named") or (support(r) < t and not r.get("names_top")), support),
    # the rule ask / chat / serve apply (model/refusal.py), at its shipped threshold: not calibrated here
    f"shipped: head or (support < {REFUSE_BELOW} and not named)": (
        lambda r, t: not r.get("head_named") or (support(r) < REFUSE_BELOW and not r.get("names_top")), support),
    "head only": (lambda r, t: not r.get("head_named"), support),
    # refusal v4 candidates: the value the answer would be pushed to is one the model itself finds unlikely
    # ("Is X male or female?" -> "The United States of America." from X's nationality)
    "head or value logprob": (lambda r, t: not r.get("head_named") or value_logprob(r) < t, value_logprob),
    "shipped or value logprob": (lambda r, t: shipped(r) or value_logprob(r) < t, value_logprob),
    "head or key cosine (v3)": (lambda r, t: not r.get("head_named") or cosine(r) < t, cosine),
    "key cosine only": (lambda r, t: cosine(r) < t, cosine),
    "head or share of cited": (lambda r, t: not r.get("head_named") or r.get("top_share_of_cited", 0) < t,
                               lambda r: r.get("top_share_of_cited", 0.0)),
}


def refusal_scores(rows: list[dict], refuse) -> dict:
    pos = np.array([bool(refuse(r)) for r in rows])
    ans = np.array([r["answerable"] for r in rows])
    exact = np.array([r["exact"] for r in rows])
    return {"refused_answerable": round(float(pos[ans].mean()), 4),
            "refused_unanswerable": round(float(pos[~ans].mean()), 4),
            "precision": round(float((pos & ~ans).sum() / pos.sum()), 4) if pos.sum() else None,
            # answer_exact as the user gets it with the rule on: exact and not refused (with / without gold)
            "exact_with_rule": round(float((exact & ~pos)[ans].mean()), 4),
            "exact_without_gold_with_rule": round(float((exact & ~pos)[~ans].mean()), 4)}


def aurocs(rows: list[dict]) -> dict:
    """Among answers whose head the question names: how well each signal ranks answerable above unanswerable
    (the chance that a random answerable one scores higher; 0.5 = no better than chance)."""
    named = [r for r in rows if r.get("head_named")]
    out = {}
    for name, signal in (("support", support), ("value_logprob", value_logprob), ("key_cosine", cosine)):
        a = np.array([signal(r) for r in named if r["answerable"]])
        u = np.array([signal(r) for r in named if not r["answerable"]])
        if len(a) and len(u):
            out[name] = round(float(((a[:, None] > u[None]).sum() + 0.5 * (a[:, None] == u[None]).sum())
                                    / (len(a) * len(u))), 3)
    return out


def calibrate(rows: list[dict], rule, signal, max_false: float) -> float | None:
    """The threshold refusing the most unanswerable questions with at most max_false of the answerable ones
    refused on every calibration set (each file and KB size apart)."""
    vals = sorted({signal(r) for r in rows if r.get("top_citation") and signal(r) < 1e8})
    groups = defaultdict(list)
    for r in rows:
        groups[r["key"]].append(r)
    best, best_rec = None, -1.0
    for t in [-2.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:])]:
        sc = refusal_scores(rows, lambda r: rule(r, t))
        worst = max(refusal_scores(g, lambda r: rule(r, t))["refused_answerable"] for g in groups.values())
        if worst <= max_false and sc["refused_unanswerable"] > best_rec:
            best, best_rec = t, sc["refused_unanswerable"]
    return best


def arguments(description: str) -> argparse.Namespace:
    """The command line of the scripts that calibrate on saved answers and score others (also
    lacking_filters.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--calibrate", nargs="+", required=True, help="saved answers of the dev sets")
    ap.add_argument("--score", nargs="+", required=True, help="saved answers to score")
    ap.add_argument("--max-false", type=float, default=0.03, help="answerable questions a dev set may refuse")
    ap.add_argument("--json")
    return ap.parse_args()


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    cal = load(args.calibrate)
    thresholds = {name: calibrate(cal, rule, sig, args.max_false) for name, (rule, sig) in RULES.items()}
    groups = defaultdict(list)
    for r in load(args.score) + cal:
        groups[r["key"]].append(r)
    table = {}
    for key, rows in sorted(groups.items()):
        table[f"{key[0]} {key[1]}"] = {name: refusal_scores(rows, lambda r, f=rule, t=thresholds[name]: f(r, t))
                                       for name, (rule, _) in RULES.items()}
        table[f"{key[0]} {key[1]}"]["auroc among head-named answers"] = aurocs(rows)
    print("thresholds:", {k: (round(v, 4) if v is not None else None) for k, v in thresholds.items()})
    for k, v in table.items():
        print(k)
        for name, sc in v.items():
            if "refused_answerable" not in sc:
                print(f"   {name}: {sc}")
                continue
            print(f"   {name:36s} answerable refused {sc['refused_answerable']:.3f}  unanswerable refused "
                  f"{sc['refused_unanswerable']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"max_false": args.max_false, "calibration": args.calibrate,
                                               "thresholds": thresholds, "scores": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
