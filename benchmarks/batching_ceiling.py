"""How much faster batching can make serving on this machine, from the model's own step times (issue 23).

Times, on the demo KB with the shipped adapter: the prefill of one answer alone and of 8 together, and a decode
step of 1 row and of 16 rows (BatchDecoder, as the server runs them; medians of interleaved rounds). A
request of L tokens costs the serial server p1 + L t1 and the batched one at most p8 / 8 + L t16 / 16 (full
batches, nothing else on the CPU), so their ratio is the ceiling of the throughput gain at 20 clients, before
HTTP, scheduling, partial batches and the load generator sharing the 2 cores.

    python benchmarks/batching_ceiling.py [--rounds 3] [--json benchmarks/results/batching_ceiling.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlaskv.kb.store import KnowledgeBase  # noqa: E402
from atlaskv.model.atlaskv import AtlasKV  # noqa: E402
from atlaskv.model.batching import BatchDecoder, Request  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_round(m, kb, qs: list[str]) -> dict:
    def prefill(rows: int) -> float:
        d = BatchDecoder(m)
        return timed(lambda: d.start_many([Request(q, kb, max_new_tokens=4) for q in qs[:rows]]))

    def step(rows: int, steps: int = 5) -> float:
        d = BatchDecoder(m)
        for seq in d.start_many([Request(q, kb, max_new_tokens=400, value_decoding=False) for q in qs[:rows]]):
            d.join(seq)
        d.step()  # the first step after a join rebuilds the rows' stacks
        return timed(lambda: [d.step() for _ in range(steps)]) / steps

    return {"prefill_1": prefill(1), "prefill_8": prefill(8), "step_1": step(1), "step_16": step(16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "batching_ceiling.json")
    args = ap.parse_args()
    m = AtlasKV.from_pretrained()
    kb = KnowledgeBase.open(REPO / "build" / "demo_kb")
    qs = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").read_text().splitlines()]
    qs = (qs * 16)[:16]
    one_round(m, kb, qs)  # warm: first calls are slower
    rounds = [one_round(m, kb, qs) for _ in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ceiling = {}
    for tokens in (8, 16, 32):
        serial = med["prefill_1"] + tokens * med["step_1"]
        batched = med["prefill_8"] / 8 + tokens * med["step_16"] / 16
        ceiling[str(tokens)] = {"serial_s": round(serial, 4), "batched_s": round(batched, 4),
                                "ceiling_x": round(serial / batched, 2),
                                "prefill_share_batched": round(med["prefill_8"] / 8 / batched, 3)}
    out = {"kb": "build/demo_kb", "rounds": args.rounds, "median_s": {k: round(v, 4) for k, v in med.items()},
           "per_round": rounds, "ceiling_by_answer_tokens": ceiling}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"median_s": out["median_s"], "ceiling_by_answer_tokens": ceiling}, indent=1))


if __name__ == "__main__":
    main()
