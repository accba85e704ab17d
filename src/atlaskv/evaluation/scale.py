"""Memory and latency vs KB size (DESIGN §5 `bench scale`): one fresh process per (method, size).

    zeroshot  the question alone (no KB)
    icl       every KB fact written into the prompt (while it fits the context window; no prompt cache:
              one user, one question)
    rag       faiss exact inner-product index over the KB's key embeddings in memory; the top 5 facts go
              into the prompt (retrieval and the encoder call count in the prefill)
    kblam     flat KB attention: every entry's base embeddings in memory, every entry scored
    atlaskv   HiKVP: the tree in memory, embeddings memory-mapped, each KB layer reads only its kept leaves

KBs up to the real pool's size hold real FB15k-237 facts with their MiniLM embeddings; larger ones are
synthetic: real key/value embeddings plus Gaussian noise, renormalised (so they cluster like real keys),
labelled `synthetic` in the JSON. A parent process watches each child's RSS: past the memory limit it is
killed and reported `oom`; a prefill or decode step over the time limit is reported `too_slow`.
Times on a shared CPU drift by several per cent from one process to the next, so methods can be measured in
interleaved rounds (`rounds`): each row then reports the median over rounds, and every round's value.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from atlaskv.evaluation.pool import jitter, load_pool

QUESTION = "What is the place of birth of the person who directed the film that won the award in question?"
METHODS = ("zeroshot", "icl", "rag", "kblam", "atlaskv")


def _records(start: int, n: int):
    from atlaskv.kb.triples import Triple
    from atlaskv.kb.records import KVRecord

    return [KVRecord(Triple(f"synthetic entity {i}", "synthetic relation", f"synthetic value {i}"), "tail",
                     f"the synthetic relation of synthetic entity {i}", f"synthetic value {i}", "", "")
            for i in range(start, start + n)]


def make_kb(out: Path, n: int, pool_triples: list, pool_keys: np.ndarray, pool_values: np.ndarray,
            encoder_name: str, seed: int = 0, chunk: int = 1_000_000, noise: float = 0.35) -> dict:
    """A KB of n entries at `out` (reused if it exists): real pool entries first, then synthetic ones."""
    from atlaskv.kb.records import triples_to_records
    from atlaskv.kb.store import KnowledgeBase

    if (out / "manifest.json").is_file():
        kb = KnowledgeBase.open(out)
        if kb.num_entries == n and kb.manifest.get("index"):
            return {"synthetic": n > len(pool_triples), "index_seconds": kb.manifest["index"]["seconds"]}
        import shutil
        shutil.rmtree(out)

    class _Named:  # the KB records the encoder that made the pool's embeddings
        name, dim = encoder_name, pool_keys.shape[1]

    kb = KnowledgeBase.create(out, encoder=_Named())
    n_real = min(n, len(pool_triples))
    kb.add_encoded(triples_to_records(pool_triples[:n_real], "tail"), pool_keys[:n_real], pool_values[:n_real])
    rng = np.random.default_rng(seed)
    for start in range(n_real, n, chunk):
        m = min(chunk, n - start)
        src = rng.integers(0, len(pool_keys), m)
        keys, values = (jitter(base[src], noise, rng) for base in (pool_keys, pool_values))
        kb.add_encoded(_records(start, m), keys, values)
    t0 = time.time()
    kb.build_index(show_progress=True)
    return {"synthetic": n > len(pool_triples), "index_seconds": round(time.time() - t0, 1)}


def measure(method: str, kb_dir: str | None, new_tokens: int = 8, prune_args: dict | None = None) -> dict:
    """In this process: load the model (and KB), time one prefill and `new_tokens` decode steps."""
    import torch

    from atlaskv.model.atlaskv import AtlasKV
    from atlaskv.model.pruning import PruneConfig
    from atlaskv.kb.store import KnowledgeBase

    torch.set_num_threads(os.cpu_count() or 1)
    akv = AtlasKV.from_pretrained()
    kb = KnowledgeBase.open(kb_dir) if kb_dir else None

    class Clock:  # generate() hands the streamer the prompt, then every new token as it is made
        def __init__(self):
            self.t = []

        def put(self, _):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    extra: dict = {}
    if method == "icl":
        from atlaskv.evaluation.baselines import context_window, fact_sentences, facts_prompt, prompt_tokens

        table = kb.table()
        positions = np.arange(len(table)) if table.live is None else np.flatnonzero(table.live)
        window = context_window(akv)
        cap = window // 4  # a fact line is never under 4 tokens: more facts than this cannot fit
        icl_prompt = facts_prompt(QUESTION, fact_sentences(table.triples(positions[:cap])))
        extra = {"prompt_tokens": prompt_tokens(akv, icl_prompt), "context_window": window}
        if len(positions) > cap:  # too many to write out (10^7 facts): extrapolate from the first `cap`
            extra.update(prompt_tokens=int(extra["prompt_tokens"] * len(positions) / cap), prompt_tokens_estimated=True)
        if extra["prompt_tokens"] + 1 + new_tokens > window:
            return {"status": "too_long", **extra, "peak_rss_mb": _peak_rss_mb()}
    elif method == "rag":
        from atlaskv.evaluation.baselines import RAG_TOP_K, DenseRetriever, facts_prompt, fact_sentences
        from atlaskv.kb.encoder import load_encoder

        t0 = time.perf_counter()
        table = kb.table()
        retriever = DenseRetriever(table.keys)  # removed rows stay in the index and are filtered at query time
        encoder = load_encoder(akv.adapter.config.encoder)
        extra = {"rag_index_seconds": round(time.perf_counter() - t0, 2)}

    def run(tokens: int) -> tuple[float, float]:
        kb_in, prompt = None, QUESTION
        t = time.perf_counter()
        if method in ("kblam", "atlaskv"):
            kb_in = akv.kb_inputs(kb, prune=method == "atlaskv", prune_config=PruneConfig(**(prune_args or {})))
        elif method == "icl":
            prompt = icl_prompt
        elif method == "rag":
            hits = retriever.search(encoder.encode([QUESTION]), 2 * RAG_TOP_K)[0]
            if table.live is not None:
                hits = hits[table.live[hits]]
            prompt = facts_prompt(QUESTION, fact_sentences(table.triples(hits[:RAG_TOP_K])))
        clock = Clock()
        akv.generate(prompt, kb_in, max_new_tokens=tokens, min_new_tokens=tokens, streamer=clock)
        return clock.t[1] - t, np.diff(clock.t[1:]).tolist()

    run(2)  # warm-up: first-call allocations, the KB load, centroid norms
    runs = [run(1 + new_tokens) for _ in range(2)]
    # decode: the median gap between streamed tokens over both runs (one slow step does not move it)
    return {"prefill_s": round(min(r[0] for r in runs), 4),
            "decode_s_per_token": round(float(np.median([g for r in runs for g in r[1]])), 4),
            "new_tokens": new_tokens, "peak_rss_mb": _peak_rss_mb(), "rss_file_mb": _status_mb("RssFile"), **extra}


def _status_mb(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark. Not getrusage's ru_maxrss: on Linux a child inherits its
    parent's mark through fork + exec, so every child of a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure_in_child(method: str, kb_dir: str | None, mem_limit_mb: float, time_limit_s: float,
                     prune_args: dict | None = None, new_tokens: int = 8) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "atlaskv.evaluation.scale", method, kb_dir or "", json.dumps(prune_args or {}), str(new_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak, t0 = psutil.Process(proc.pid), 0.0, time.time()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if peak > mem_limit_mb:
            proc.kill()
            proc.wait()
            return {"status": "oom", "reason": f"RSS passed the {mem_limit_mb:.0f} MB limit ({peak:.0f} MB)",
                    "peak_rss_mb": round(peak, 1)}
        if time.time() - t0 > time_limit_s:
            proc.kill()
            proc.wait()
            return {"status": "too_slow", "reason": f"no result within {time_limit_s:.0f} s",
                    "peak_rss_mb": round(peak, 1)}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"status": "error", "reason": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    res = json.loads(out.strip().splitlines()[-1])
    if res.get("status") == "too_long":
        return {**res, "reason": f"{res['prompt_tokens']} prompt tokens > the {res['context_window']}-token window"}
    slow = res["decode_s_per_token"] > 10 or res["prefill_s"] > 60
    return {**res, "status": "too_slow" if slow else "ok",
            **({"reason": "over 10 s per token or 60 s per prefill"} if slow else {})}


def bench_scale(sizes: list[int], methods: list[str], work_dir: Path, pool_set: Path, mem_limit_mb: float = 16000,
                time_limit_s: float = 600, prune_args: dict | None = None, log=print, new_tokens: int = 8,
                rounds: int = 1) -> dict:
    from atlaskv.kb.encoder import load_encoder

    enc = load_encoder()
    pool = load_pool(pool_set, enc)
    rows = []
    for n in sizes:
        kb_dir = work_dir / f"kb-{n}"
        info = make_kb(kb_dir, n, pool.triples, pool.keys, pool.values, enc.name) if set(methods) - {"zeroshot"} else {}
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(rounds):  # interleaved (a, b, a, b, ...): a slow spell of the machine hits every method
            for method in methods:
                if runs[method] and runs[method][-1]["status"] != "ok":
                    continue  # oom / too_slow / too_long once is enough
                res = measure_in_child(method, None if method == "zeroshot" else str(kb_dir), mem_limit_mb,
                                       time_limit_s, prune_args if method == "atlaskv" else None, new_tokens)
                runs[method].append(res)
                log(json.dumps({"method": method, "kb_size": n, "round": r, **res}))
        for method in methods:
            row = {"method": method, "kb_size": n, **_median_round(runs[method]), **info}
            rows.append(row)
            log(json.dumps(row))
    return {"question": QUESTION, "pool": str(pool_set), "machine": _machine(), "prune": prune_args or {},
            "rounds": rounds, "results": rows}


def _median_round(runs: list[dict]) -> dict:
    """One row from a method's rounds: median times, the highest peak RSS, and each round's times."""
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) < len(runs):  # a round that failed (oom, too_slow, too_long, error) is the row
        return runs[-1]
    if len(runs) == 1:
        return runs[0]
    row = dict(ok[0])
    for k in ("prefill_s", "decode_s_per_token"):
        row[k] = round(float(np.median([r[k] for r in ok])), 4)
        row[k + "_rounds"] = [r[k] for r in ok]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return row


def _machine() -> dict:
    import platform

    import psutil
    import torch

    return {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version()}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in result["results"]):
        rs = [r for r in result["results"] if r["method"] == method and r["status"] == "ok"]
        if not rs:
            continue
        xs = [r["kb_size"] for r in rs]
        axes[0].plot(xs, [r["peak_rss_mb"] for r in rs], "o-", label=method)
        axes[1].plot(xs, [r["decode_s_per_token"] * 1000 for r in rs], "o-", label=method)
        for r in result["results"]:
            if r["method"] == method and r["status"] != "ok":
                axes[0].annotate(r["status"], (r["kb_size"], axes[0].get_ylim()[1]), fontsize=8)
    for ax, label in zip(axes, ("peak RSS (MB)", "decode ms / token")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KB size (triples)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M, CPU (2 cores); sizes above the real pool are synthetic")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":  # the child process of measure_in_child
    print(json.dumps(measure(sys.argv[1], sys.argv[2] or None, new_tokens=int(sys.argv[4]) if len(sys.argv) > 4 else 8,
                             prune_args=json.loads(sys.argv[3]))))
