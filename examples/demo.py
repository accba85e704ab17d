"""`make demo`: answer real questions from the bundled demo KB with the facts they cite, then teach the
model a new fact live (no retraining) and ask about it. `python examples/demo.py ADAPTER_DIR`: the same with
another adapter (default: the shipped one)."""
import json
import sys
import time
from pathlib import Path

from atlaskv import AtlasKV, KnowledgeBase
from atlaskv.evaluation.metrics import contains_answer

HERE = Path(__file__).resolve().parent / "demo"
KB_DIR = Path("build/demo_kb")


def show(akv, kb, question, gold=None):
    t0 = time.time()
    ans = akv.ask(question, kb, max_new_tokens=40).or_refusal()  # "I don't know." when no fact stands out
    refused = f"  [refused: no {ans.missing[1]!r} fact about {ans.missing[0]}]" if ans.missing else "  [refused]"
    mark = (refused if ans.refused else "" if gold is None
            else "  [right]" if contains_answer(ans.text, gold) else f"  [wrong: {gold}]")
    print(f"\nQ: {question}\nA: {ans.text}{mark}   ({time.time() - t0:.1f} s, support {ans.support:.1f})")
    for t, w in ans.citations[:2]:
        print(f"   {w:6.1%}  {t.head} | {t.relation} | {t.tail}")


def main(adapter: str | None = None):
    kb = (KnowledgeBase.open(KB_DIR) if (KB_DIR / "manifest.json").exists()
          else KnowledgeBase.build(HERE / "facts.tsv", KB_DIR))
    print(f"KB {KB_DIR}: {len(kb):,} facts, version {kb.version}, encoder {kb.encoder_name}")
    akv = AtlasKV.from_pretrained(adapter)
    print("Answers with the facts the model attended to most (share of its KB attention):")
    for line in open(HERE / "questions.jsonl", encoding="utf-8").readlines()[:6]:
        q = json.loads(line)
        show(akv, kb, q["question"], q["tail"])

    print("\n--- a fact the KB lacks: it holds nine about John F. Kennedy, his place of death among them")
    show(akv, kb, "What is the place of birth of John F. Kennedy?")

    fact = ("Mount Kilimanjaro", "country", "Tanzania")
    question = "What is the country of Mount Kilimanjaro?"
    print("\n--- live update: the KB knows nothing about Mount Kilimanjaro yet")
    show(akv, kb, question)
    res = kb.add([fact])
    print(f"\nadded {fact} -> KB version {res.version}, {len(kb):,} facts (one new segment, nothing re-encoded)")
    show(akv, kb, question, fact[2])
    kb.remove([fact])  # leave the demo KB as it was built
    print(f"\nremoved it again -> KB version {kb.version}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
