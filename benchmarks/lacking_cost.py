"""What the lacking-key check (model/probes.py, refusal v6) adds to an answer: its time beside the answer's own
(prefill + decoding), cold (the sentence encoder runs on the entity's lacking keys; the relation templates
it ranks them by are encoded once per process, on the first question) and warm (the keys cached too, as for a
second question about the same entity), on the demo KB with the default path (HiKVP, value decoding).

    python benchmarks/lacking_cost.py build/demo_kb --json benchmarks/results/refusal_v6/lacking_cost.json
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from atlaskv.kb.records import ENTITY
from atlaskv.kb.store import KnowledgeBase
from atlaskv.model import probes
from atlaskv.model.atlaskv import AtlasKV

QUESTIONS = [json.loads(line)["question"] for line in
             (Path(__file__).resolve().parents[1] / "examples" / "demo" / "questions.jsonl").read_text().splitlines()]
QUESTIONS += ["What is the place of birth of John F. Kennedy?", "Where did John F. Kennedy die?",
              "Is Elvis Presley male or female?", "What is the religion of Robert F. Kennedy?",
              "Where was Michael Jackson born?", "What is the time zone of Memphis?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kb")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    kb = KnowledgeBase.open(args.kb)
    akv = AtlasKV.from_pretrained()
    t0 = time.perf_counter()
    akv.ask("What is the capital of Canada?", kb, max_new_tokens=4)  # warm-up: tensors, tree, encoder, templates
    first_s = time.perf_counter() - t0
    shapes = {t.replace(ENTITY, "it") for t in kb.view().key_templates().values()}
    rows = []
    for q in QUESTIONS:
        kb_in = akv.kb_inputs(kb, record=True)
        t0 = time.perf_counter()
        akv.generate(q, kb_in, max_new_tokens=48)
        answer_s = time.perf_counter() - t0
        for key in [k for k in probes._CACHE if k[1] not in shapes]:  # the entity keys, not the templates
            del probes._CACHE[key]
        t0 = time.perf_counter()
        lk = probes.lacking_fact(akv.adapter, akv.encoder, kb_in, q)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        probes.lacking_fact(akv.adapter, akv.encoder, kb_in, q)
        warm = time.perf_counter() - t0
        rows.append({"question": q, "answer_s": round(answer_s, 3), "lacking_cold_s": round(cold, 4),
                     "lacking_warm_s": round(warm, 4), "lacking": lk and [lk.relation, lk.ratio]})
        print(rows[-1])
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in ("answer_s", "lacking_cold_s", "lacking_warm_s")}
    med["cold_over_answer"] = round(med["lacking_cold_s"] / med["answer_s"], 3)
    med["first_ask_s"] = round(first_s, 3)  # the warm-up ask: model tensors, tree, and every template encoded
    print("medians:", med)
    if args.json:
        Path(args.json).write_text(json.dumps({"kb": args.kb, "facts": len(kb), "medians": med, "rows": rows},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
