"""Where a batched prefill and a batched decode step spend their time (cProfile, demo KB, shipped adapter):
the evidence for what to speed up in serving next. Prints the wall time of each and its top functions.

    python benchmarks/profile_batching.py [PREFILL_ROWS] [DECODE_ROWS] [KB]   # default 8, 16, build/demo_kb
"""
from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlaskv.kb.store import KnowledgeBase  # noqa: E402
from atlaskv.model.atlaskv import AtlasKV  # noqa: E402
from atlaskv.model.batching import BatchDecoder, Request  # noqa: E402


def profiled(label: str, fn, top: int = 12) -> None:
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    print(f"== {label}: {(time.perf_counter() - t) * 1000:.0f} ms")
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def main(prefill_rows: int = 8, decode_rows: int = 16, kb_path: str | None = None) -> None:
    m = AtlasKV.from_pretrained()
    kb = KnowledgeBase.open(kb_path or REPO / "build" / "demo_kb")
    qs = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").read_text().splitlines()]
    qs = qs * (1 + (prefill_rows + decode_rows) // len(qs))
    d = BatchDecoder(m)
    d.start_many([Request(q, kb, max_new_tokens=4) for q in qs[:prefill_rows]])  # warm: first calls are slower
    profiled(f"prefill of {prefill_rows} rows",
             lambda: d.start_many([Request(q, kb, max_new_tokens=4) for q in qs[prefill_rows:2 * prefill_rows]]))
    d = BatchDecoder(m)
    for seq in d.start_many([Request(q, kb, max_new_tokens=400, value_decoding=False) for q in qs[:decode_rows]]):
        d.join(seq)
    d.step()
    profiled(f"5 decode steps of {len(d.rows)} rows", lambda: [d.step() for _ in range(5)])


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:4])
