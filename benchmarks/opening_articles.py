"""How many saved answers put an article (or an article and one word) straight before a value that does not open
with it ("The Male.", "The state Iowa.": the value decoding's push after the model's opening "The"), and how many
open with an article at all, per file and KB size (eval grounding --save-answers; no model runs).

    python benchmarks/opening_articles.py benchmarks/results/own_refusal/s1.59/fb15k-train-para.jsonl \
        benchmarks/results/article_opening/fb15k-train-para.jsonl [--json out.json]
    python benchmarks/opening_articles.py NEW.jsonl ... --before OLD.jsonl ...   # what changed between two runs
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ARTICLES = ("the", "a", "an")


def article_before_value(answer: str, values: list[str], between: int = 0) -> bool:
    """The answer is an article, `between` words (letters only), then one of the cited values as stored (case
    kept), which does not itself open with that article, and the value ends the sentence or clause ("The Male.",
    "The state Iowa." with between=1; not "The Police originated ...")."""
    words = answer.split(maxsplit=1 + between)
    if len(words) < 2 + between or words[0].casefold() not in ARTICLES or not all(w.isalpha() for w in words[1:1 + between]):
        return False
    rest = words[1 + between]
    return any(v and rest.startswith(v) and rest[len(v):len(v) + 1] in ("", ".", ",", "!", "?", ";", ":")
               and not v.casefold().startswith(words[0].casefold() + " ") for v in values)


def count(path: str) -> dict:
    out = defaultdict(lambda: {"answers": 0, "article_before_value": 0, "article_word_before_value": 0,
                               "opens_with_article": 0})
    for line in Path(path).read_text("utf-8").splitlines():
        r = json.loads(line)
        cited = (r.get("signals") or {}).get("cited") or ([r["top_citation"]] if r.get("top_citation") else [])
        c = out[str(r["kb_size"])]
        c["answers"] += 1
        c["article_before_value"] += article_before_value(r["answer"], [t[2] for t in cited])
        c["article_word_before_value"] += article_before_value(r["answer"], [t[2] for t in cited], between=1)
        c["opens_with_article"] += r["answer"].split(maxsplit=1)[:1] != [] and \
            r["answer"].split(maxsplit=1)[0].casefold() in ARTICLES
    return dict(out)


def changes(before: str, after: str) -> dict:
    """Answers (with and without the gold fact) that differ between two runs of the same questions: how many are
    the earlier answer without its opening article (or article and one word), and how many differ otherwise."""
    def rows(path):
        return {(r["question"], r["kb_size"]): r for r in map(json.loads, Path(path).read_text("utf-8").splitlines())}
    old, new = rows(before), rows(after)
    out = {"compared": 0, "article_left_out": 0, "other": 0}
    for key, r in new.items():
        for field in ("answer", "answer_without_gold"):
            a, b = old[key].get(field) or "", r.get(field) or ""
            out["compared"] += 1
            if a != b:
                parts = a.split()
                dropped = len(parts) > 1 and parts[0].casefold() in ARTICLES and b in (
                    " ".join(parts[1:]), " ".join(parts[2:]))
                out["article_left_out" if dropped else "other"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("answers", nargs="+", help="saved answers (.jsonl)")
    ap.add_argument("--before", nargs="+", help="the same questions' answers from an earlier run, one per file: "
                                                 "how the answers changed")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.before:
        if len(args.before) != len(args.answers):
            raise SystemExit("--before needs one earlier file per answers file")
        for b, a in zip(args.before, args.answers):
            print(f"{b} -> {a}: {changes(b, a)}")
    result = {p: count(p) for p in args.answers}
    for p, sizes in result.items():
        for size, c in sorted(sizes.items(), key=lambda kv: int(kv[0])):
            print(f"{p}  KB {size}: {c['answers']} answers, {c['article_before_value']} \"The <value>.\", "
                  f"{c['article_word_before_value']} \"The <word> <value>.\", {c['opens_with_article']} open with an article")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
