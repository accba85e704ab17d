"""Where a batched answer's time goes, in-process (no HTTP): SmolLM2-135M + shipped adapter on the demo KB.

    base prefill     a 30-token prompt through the stock model, alone and in batches of 4 / 8 / 16
    decode step      BatchDecoder.step with 1 / 5 / 10 / 16 rows (value decoding off, so no row ends)
    answers          24 demo questions: AtlasKV.ask one by one against start_many (8 at a time) + step
    KB add           KnowledgeBase.add of 1 and of 32 new triples to a copy of the KB (what one group commit of
                     the server's writer costs: the encoder's batch-exact pass dominates)

    python benchmarks/bench_batching.py       # results/batching_steps.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlaskv.kb.store import KnowledgeBase  # noqa: E402
from atlaskv.model.atlaskv import AtlasKV  # noqa: E402
from atlaskv.model.batching import BatchDecoder, Request  # noqa: E402


def timed(fn, rounds: int) -> float:
    fn()  # warm
    t = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t) / rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", type=Path, default=REPO / "build" / "demo_kb", help="built by `make demo`")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batching_steps.json")
    a = ap.parse_args(argv)
    m = AtlasKV.from_pretrained()
    kb = KnowledgeBase.open(a.kb)
    qs = [json.loads(line)["question"] for line in (REPO / "examples" / "demo" / "questions.jsonl").read_text().splitlines()]
    out = {"what": __doc__.splitlines()[0], "command": "python benchmarks/bench_batching.py", "threads": torch.get_num_threads()}

    prefill = {}
    for B in (1, 4, 8, 16):
        ids = torch.randint(100, 1000, (B, 30))
        with torch.no_grad():
            s = timed(lambda: m.model(ids, logits_to_keep=1), 3)
        prefill[B] = {"ms": round(s * 1000, 1), "ms_per_prompt": round(s * 1000 / B, 1)}
    out["base_prefill_30_tokens"] = prefill

    steps = {}
    for B in (1, 5, 10, 16):
        d = BatchDecoder(m)
        for seq in d.start_many([Request(q, kb, max_new_tokens=400, value_decoding=False) for q in (qs * 4)[:B]]):
            d.join(seq)
        steps[B] = {"ms": round(timed(d.step, 5) * 1000, 1)}
    out["decode_step_rows"] = steps

    questions = (qs * 3)[:24]
    t = time.perf_counter()
    lone = [m.ask(q, kb, max_new_tokens=32) for q in questions]
    t_lone = time.perf_counter() - t
    d = BatchDecoder(m)
    t = time.perf_counter()
    seqs = []
    for g in range(0, len(questions), 8):
        for seq in d.start_many([Request(q, kb, max_new_tokens=32) for q in questions[g:g + 8]]):
            seqs.append(seq)
            d.join(seq)
    while d.rows:
        d.step()
    t_batch = time.perf_counter() - t
    same = sum(a.text == s.answer.text for a, s in zip(lone, seqs))
    out["answers"] = {"n": len(questions), "lone_s_each": round(t_lone / len(questions), 3),
                      "batched_s_each": round(t_batch / len(questions), 3), "same_text": same}
    import shutil
    import tempfile

    adds = {}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(a.kb, Path(tmp) / "kb")
        KnowledgeBase.open(Path(tmp) / "kb").add([("bench warm-up", "country", "Atlantis")])  # encoder warm
        for n in (1, 32):
            new = [(f"bench entity {n} {i}", "country", "Atlantis") for i in range(n)]
            t = time.perf_counter()
            KnowledgeBase.open(Path(tmp) / "kb").add(new)
            adds[n] = {"s": round(time.perf_counter() - t, 3)}
    out["kb_add_triples"] = adds
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
