"""`make demo`: build the bundled demo KB, answer real questions with cited facts, add a fact live."""
import json
import time
from pathlib import Path

from atlaskv import KnowledgeBase
from atlaskv.model import AtlasKV

HERE = Path(__file__).resolve().parent / "demo"
KB_DIR = Path("build/demo_kb")


def show(akv, kb, question):
    t0 = time.time()
    ans = akv.ask(question, kb, max_new_tokens=40)
    print(f"\nQ: {question}\nA: {ans.text}   ({time.time() - t0:.1f} s, KB of {ans.kb_size:,} facts)")
    for t, w in ans.citations[:3]:
        print(f"   {w:6.1%}  {t.head} | {t.relation} | {t.tail}")


def main():
    kb = (KnowledgeBase.open(KB_DIR) if (KB_DIR / "manifest.json").exists()
          else KnowledgeBase.build(HERE / "facts.tsv", KB_DIR))
    print(kb.info())
    akv = AtlasKV.from_pretrained()
    for line in open(HERE / "questions.jsonl", encoding="utf-8").readlines()[:6]:
        show(akv, kb, json.loads(line)["question"])
    fact = ("Ada Lovelace", "place of birth", "London")
    if tuple(fact) not in {tuple(t) for t in kb.triples()}:
        kb.add([fact])
        print(f"\nadded live: {fact} (KB version {kb.version})")
    show(akv, kb, "What is the place of birth of Ada Lovelace?")
    kb.remove([fact])  # leave the demo KB as it was built
    print(f"removed it again (KB version {kb.version})")


if __name__ == "__main__":
    main()
