"""A decode step of 16 answers that started apart: the KB layers as one batch over the rows' stacked leaves
(attention._decode_rows, the default) against row by row (each row's own _decode_step, as before), in
alternating trials in one process (this machine drifts 10-15 % between runs, so only same-run ratios count).

    python benchmarks/ab_decode_rows.py [ROWS]      # prints the median ms per step of each and every trial
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import atlaskv.model.attention as attention  # noqa: E402
from atlaskv.kb.store import KnowledgeBase  # noqa: E402
from atlaskv.model.atlaskv import AtlasKV  # noqa: E402
from atlaskv.model.batching import BatchDecoder, Request  # noqa: E402


def row_by_row(query, key, value, attention_mask, scaling, adapter, layer, q_kb, rows, f):
    def row(m, b):
        return m[b:b + 1] if m is not None and m.shape[0] > 1 else m
    outs = [attention._decode_step(query[b:b + 1], key[b:b + 1], value[b:b + 1], row(attention_mask, b), scaling,
                                   adapter, layer, q_kb[b:b + 1], one, f)[0] for b, one in enumerate(rows.rows)]
    return torch.cat(outs), None


def main(rows: int = 16, trials: int = 6) -> dict:
    m = AtlasKV.from_pretrained()
    kb = KnowledgeBase.open(REPO / "build" / "demo_kb")
    qs = [json.loads(line)["question"] for line in (REPO / "examples/demo/questions.jsonl").read_text().splitlines()]
    kinds = {"batched": attention._decode_rows, "row_by_row": row_by_row}
    ms = {k: [] for k in kinds}
    for trial in range(trials):
        for kind in (list(kinds) if trial % 2 == 0 else list(kinds)[::-1]):
            attention._decode_rows = kinds[kind]
            d = BatchDecoder(m)
            for seq in d.start_many([Request(q, kb, max_new_tokens=400, value_decoding=False) for q in (qs * 4)[:rows]]):
                d.join(seq)
            d.step()
            t = time.perf_counter()
            for _ in range(5):
                d.step()
            ms[kind].append(round((time.perf_counter() - t) / 5 * 1000, 1))
    attention._decode_rows = kinds["batched"]
    return {"rows": rows, **{k: {"median_ms": statistics.median(v), "trials_ms": v} for k, v in ms.items()}}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 16), indent=1))
