"""Encoder throughput (sentences/s) and `kb build` throughput (triples/s) on real triples.

    .venv/bin/python benchmarks/bench_build.py [--n 10000] [--out benchmarks/results/build_throughput.json]

Data: the first N lines of ../shared/eval/fb15k-dense/triples.tsv (real FB15k-237 facts with readable
names). Each figure is the best of --repeats runs (less noise on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("ATLASKV_SHARED", REPO.parent / "shared")) / "eval/fb15k-dense/triples.tsv")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/build_throughput.json")
    args = ap.parse_args()

    import torch

    from atlaskv.kb.encoder import load_encoder
    from atlaskv.kb.triples import read_triples, write_triples
    from atlaskv.kb.records import triples_to_records
    from atlaskv.kb.store import KnowledgeBase

    triples = read_triples(args.data).triples[: args.n]
    if len(triples) < args.n:
        sys.exit(f"{args.data}: only {len(triples)} triples, need {args.n}")
    work = Path(tempfile.mkdtemp(prefix="atlaskv-bench-"))
    src = work / "triples.tsv"
    write_triples(triples, src)

    t0 = time.perf_counter()
    enc = load_encoder()
    load_s = time.perf_counter() - t0
    keys = [r.key_text for r in triples_to_records(triples)]
    enc.encode(keys[:512], args.batch_size)  # warm-up
    enc_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        enc.encode(keys, args.batch_size, show_progress=False)
        enc_s.append(time.perf_counter() - t0)

    build_s = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        kb = KnowledgeBase.build(src, work / f"kb{i}", encoder=enc, batch_size=args.batch_size,
                                 show_progress=False)
        build_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    KnowledgeBase.open(kb.path, verify=True)
    verify_s = time.perf_counter() - t0
    result = {
        "benchmark": "build_throughput", "data": str(args.data.relative_to(args.data.parents[2]))
        if len(args.data.parents) > 2 else str(args.data), "n_triples": len(triples),
        "encoder": enc.name, "batch_size": args.batch_size, "repeats": args.repeats,
        "encoder_load_s": round(load_s, 3),
        "encoder_sentences_per_s": round(len(keys) / min(enc_s), 1),
        "kb_build_s": round(min(build_s), 3),
        "kb_build_triples_per_s": round(len(triples) / min(build_s), 1),
        "kb_verify_s": round(verify_s, 3), "kb_bytes_on_disk": kb.bytes_on_disk(),
        "note": "kb build = read + KG2KV + encode keys and values (2 sentences per triple) + write + checksum",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
