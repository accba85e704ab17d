"""Flat KB attention micro-benchmark on the real SmolLM2-135M-Instruct: forward time and peak memory.

    .venv/bin/python benchmarks/bench_attention.py [--sizes 0,100,1000,10000] [--prompt-tokens 64]

Batch 1, a 64-token prompt, KBs of N real FB15k-237 entries (first N lines of
../shared/eval/fb15k-dense/triples.tsv, encoded with all-MiniLM-L6-v2), flat mode (every entry scored at
every KB layer), KB keys/values at query-head width (the committed results also have the GQA-width "kv"
layout, removed since: it saved memory but no shipped adapter used it). The adapter is untrained (KB query heads copied from q_proj): cost does not depend on
training. Each (layout, N) runs in its own process so peak RSS is its own; times are medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def child(kb_dir: str, n: int, layout: str, prompt_tokens: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from atlaskv.model.kb_inputs import KBInputs, use_kb
    from atlaskv.model.atlaskv import AtlasKV
    from atlaskv.kb.store import KnowledgeBase

    torch.manual_seed(0)
    assert layout == "query", "the kv layout was removed"
    akv = AtlasKV.from_base_model()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _, keys, values = KnowledgeBase.open(kb_dir).embeddings()
    keys = torch.from_numpy(np.asarray(keys[:n], np.float32))
    values = torch.from_numpy(np.asarray(values[:n], np.float32))
    ids = torch.randint(100, 40000, (1, prompt_tokens))
    kb = (lambda: KBInputs(keys, values)) if n else (lambda: None)

    def prefill():
        with torch.no_grad(), use_kb(kb()):
            return akv.model(ids, use_cache=True)

    prefill()  # warm-up
    t_prefill = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = prefill()
        t_prefill.append(time.perf_counter() - t0)
    nxt = out.logits[:, -1:].argmax(-1)
    t_decode = []
    for _ in range(repeats):
        kbi = kb()  # as in generate(): one KBInputs for the prefill and every decode step
        with torch.no_grad(), use_kb(kbi):
            cache = akv.model(ids, use_cache=True).past_key_values
            t0 = time.perf_counter()
            akv.model(nxt, past_key_values=cache, use_cache=True)
            t_decode.append(time.perf_counter() - t0)
    return {"layout": layout, "kb_size": n, "prefill_s": statistics.median(t_prefill),
            "decode_step_s": statistics.median(t_decode),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_model_load_mb": rss_loaded,
            "adapter_params": akv.adapter.num_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,100,1000,10000")
    ap.add_argument("--layouts", default="query")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("ATLASKV_SHARED", REPO.parent / "shared"))
                    / "eval/fb15k-dense/triples.tsv")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/attention_flat.json")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kb_dir, n, layout, pt, rep = args.child
        print(json.dumps(child(kb_dir, int(n), layout, int(pt), int(rep))))
        return

    from atlaskv.kb.triples import read_triples
    from atlaskv.kb.store import KnowledgeBase

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="atlaskv-bench-attn-"))
    triples = read_triples(args.data).triples[: max(sizes)]
    KnowledgeBase.build(triples, work / "kb", show_progress=False)
    rows = []
    for layout in args.layouts.split(","):
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(work / "kb"), str(n), layout,
                                  str(args.prompt_tokens), str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    import torch

    result = {"benchmark": "attention_flat", "model": "SmolLM2-135M-Instruct (fp32)", "batch": 1,
              "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "data": "eval/fb15k-dense/triples.tsv",
              "results": rows,
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for layout in args.layouts.split(","):
            rs = [r for r in rows if r["layout"] == layout]
            xs = [max(r["kb_size"], 1) for r in rs]
            for ax, key, label in zip(axes, ("prefill_s", "decode_step_s", "peak_rss_mb"),
                                      ("prefill (64 tokens), s", "one decode step, s", "peak RSS, MB")):
                ax.plot(xs, [r[key] for r in rs], marker="o", label=f"kb_heads={layout}")
                ax.set_xscale("log")
                ax.set_xlabel("KB entries (0 plotted at 1)")
                ax.set_title(label)
        axes[0].legend()
        fig.suptitle("Flat KB attention, SmolLM2-135M fp32, CPU (2 cores)")
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
