"""`kb build` throughput, local engine vs Ray engine (local Ray instance), on the same real triples.

    .venv/bin/python benchmarks/bench_ray_build.py [--n 20000] [--num-cpus 2] [--out benchmarks/results/build_ray.json]

Data: the first N lines of ../shared/eval/fb15k-dense/triples.tsv (real FB15k-237 facts), written as
four shards (TSV and Parquet). Both engines run end to end (read, KG2KV, encode keys and values, write,
HiKVP index, commit); the local figure includes loading the encoder once, the Ray figure starting its
encoder actors (each loads the encoder), but not starting Ray itself (timed separately). Each engine's
stages are timed too, and the two KBs are checked equal (records and fp16 embeddings).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--segment-rows", type=int, default=2_500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("ATLASKV_SHARED", REPO.parent / "shared")) / "eval/fb15k-dense/triples.tsv")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/build_ray.json")
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from atlaskv.kb.encoder import _CACHE
    from atlaskv.kb.triples import read_triples, write_triples
    from atlaskv.kb.store import KnowledgeBase

    triples = read_triples(args.data).triples[: args.n]
    if len(triples) < args.n:
        sys.exit(f"{args.data}: only {len(triples)} triples, need {args.n}")
    work = Path(tempfile.mkdtemp(prefix="atlaskv-bench-ray-"))
    files = []
    for i, part in enumerate(np.array_split(np.arange(len(triples)), args.shards)):
        f = work / f"part-{i}.{'parquet' if i % 2 else 'tsv'}"
        write_triples([triples[j] for j in part], f)
        files.append(f)

    _CACHE.clear()
    t0 = time.perf_counter()
    local = KnowledgeBase.build(files, work / "local", batch_size=args.batch_size, show_progress=False)
    local_s = time.perf_counter() - t0
    local_index_s = local.manifest["index"]["seconds"]
    import resource

    local_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray_start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rkb = KnowledgeBase.build(files, work / "ray", engine="ray", batch_size=args.batch_size,
                              segment_rows=args.segment_rows, show_progress=False)
    ray_s = time.perf_counter() - t0
    ray.shutdown()
    rh = rkb.manifest["history"][-1]["ray"]

    same_records = rkb.records().equals(local.records())
    same_emb = all(np.array_equal(a, b) for a, b in zip(local.embeddings(), rkb.embeddings()))
    n = len(triples)
    result = {
        "benchmark": "build_ray", "data": "eval/fb15k-dense/triples.tsv", "n_triples": n,
        "shards": len(files), "encoder": local.encoder_name, "batch_size": args.batch_size,
        "local": {"seconds": round(local_s, 2), "triples_per_s": round(n / local_s, 1),
                  "index_s": local_index_s, "encoder_load_included": True, "peak_rss_mb": local_rss_mb},
        "ray": {"seconds": round(ray_s, 2), "triples_per_s": round(n / ray_s, 1), "ray_init_s": round(ray_start_s, 2),
                "num_cpus": args.num_cpus, "actors": rh["actors"], "segments": rh["segments"],
                "segment_rows": args.segment_rows, "read_s": rh["read_s"], "encode_s": rh["encode_s"],
                "index_s": rh.get("index_s"), "actor_peak_rss_mb": rh.get("actor_peak_rss_mb"),
                "encode_triples_per_s": round(n / rh["encode_s"], 1)},
        "ray_over_local": round(local_s / ray_s, 3),
        "identical_records": bool(same_records), "fp16_equal_embeddings": bool(same_emb),
        "index_stats": {"local": local.manifest["index"]["stats"], "ray": rkb.manifest["index"]["stats"]},
        "kb_bytes_on_disk": {"local": local.bytes_on_disk(), "ray": rkb.bytes_on_disk()},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "gpu": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
