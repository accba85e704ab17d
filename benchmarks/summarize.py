"""Markdown table of the committed grounding results (pasted into docs/results.md).

    .venv/bin/python benchmarks/summarize.py
"""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def main() -> None:
    print("| set | distractors | KB size | ACC@1 | ACC@5 | answer EM | EM without gold | questions (answered) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for f in sorted(RESULTS.glob("grounding_*.json")):
        d = json.loads(f.read_text())
        for r in d["results"]:
            print(f"| {d['set']} | {d.get('distractors', 'random')} | {r['kb_size']:,} | {fmt(r['acc1'])} | "
                  f"{fmt(r['acc5'])} | {fmt(r['answer_em'])} | {fmt(r['answer_em_without_gold'])} | "
                  f"{r['n_questions']} ({r.get('n_answer_questions', r['n_questions'])}) |")


if __name__ == "__main__":
    main()
