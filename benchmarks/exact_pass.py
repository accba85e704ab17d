"""The shape of `encode_exact`'s passes (kb/encoder.py EXACT_PASS, a per-KB setting): what a live add's pass
costs under each shape, whether the shapes and the thread counts give the same bits, and how fast a build
encodes. Real MiniLM, real texts (the key and value texts of the evaluation sets' first 3,000 triples each).

    .venv/bin/python benchmarks/exact_pass.py   -> benchmarks/results/exact_pass.json
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from atlaskv.kb.encoder import EXACT_PASS, LEGACY_EXACT_PASS, load_encoder
from atlaskv.kb.records import triples_to_records
from atlaskv.kb.triples import read_triples

EVAL = Path(os.environ.get("ATLASKV_SHARED", "../shared")) / "eval"
SHAPES = [LEGACY_EXACT_PASS, (512, 32), EXACT_PASS, (128, 8), (1, 1)]
ADD = ["the place of birth of Ada Lovelace", "London", "the spouse of Humphrey Bogart", "Lauren Bacall"]


def main() -> None:
    enc = load_encoder()
    triples = [t for s in ("fb15k", "fb15k-para", "pararel") for t in read_triples(EVAL / s / "triples.tsv").triples[:3000]]
    recs = triples_to_records(triples)
    texts = sorted({r.key_text for r in recs} | {r.value_text for r in recs})
    vocab = sorted(w for w in enc.model.tokenizer.get_vocab() if w.isalpha() and len(w) > 3)
    short = vocab[:150] + [" ".join(vocab[i:i + 3]) for i in range(150, 600, 3)]  # one-token names broke it once
    legacy = enc.encode_exact(texts, reuse=False, shape=LEGACY_EXACT_PASS, show_progress=False)
    out = {"texts": len(texts), "add_texts": ADD, "threads": torch.get_num_threads(), "shapes": []}
    for shape in SHAPES:
        enc.encode_exact(ADD, reuse=False, shape=shape)
        t = time.perf_counter()
        for _ in range(5):
            enc.encode_exact(ADD, reuse=False, shape=shape)
        add_s = (time.perf_counter() - t) / 5
        t = time.perf_counter()
        vecs = enc.encode_exact(texts, reuse=False, shape=shape, show_progress=False)
        build = len(texts) / (time.perf_counter() - t)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = enc.encode_exact(short + texts[:1500], reuse=False, shape=shape, show_progress=False)
        finally:
            torch.set_num_threads(before)
        two = enc.encode_exact(short + texts[:1500], reuse=False, shape=shape, show_progress=False)
        row = {"shape": list(shape), "add_pass_s": round(add_s, 3), "build_texts_per_s": round(build),
               "rows_differing_from_legacy": int((vecs != legacy).any(1).sum()),
               "rows_differing_1_vs_2_threads": int((one != two).any(1).sum())}
        print(row, flush=True)
        out["shapes"].append(row)
    Path("benchmarks/results/exact_pass.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
