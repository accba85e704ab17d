"""Why the server keeps torch's worker pool on one thread only (serve/threads.py): the time of one 8-answer
prefill (demo facts, shipped adapter) run in a second thread, with and without the main thread having run
torch first, against the same in the main thread. Each case runs in a fresh process, in turn, `--rounds` times.

    python benchmarks/openmp_threads.py            # -> results/openmp_threads.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "main": "everything in the main thread",
    "second_thread_after_main_loaded": "the model loaded in the main thread, the prefills in a second thread "
                                       "(the server before serve/threads.py)",
    "second_thread_after_passing_load": "the model loaded in a thread that ended, the prefills in a second "
                                        "thread (the server now)",
}


def case(name: str, kb_dir: str, repeats: int) -> float:
    sys.path.insert(0, str(REPO / "src"))
    from atlaskv.kb.store import KnowledgeBase
    from atlaskv.kb.triples import read_triples
    from atlaskv.model.atlaskv import AtlasKV
    from atlaskv.model.batching import BatchDecoder, Request
    from atlaskv.serve.threads import in_passing_thread

    kb = KnowledgeBase.open(kb_dir)
    facts = read_triples(REPO / "examples" / "demo" / "facts.tsv").triples
    rng = random.Random(0)
    qs = [f"What is the {t.relation} of {t.head}?" for t in rng.sample(facts, 8)]

    def load():
        m = AtlasKV.from_pretrained()
        BatchDecoder(m).start_many([Request(q, kb, max_new_tokens=2) for q in qs])  # warm
        return m
    times: list[float] = []

    def prefills(m):
        d = BatchDecoder(m)
        for _ in range(repeats):
            t = time.perf_counter()
            d.start_many([Request(q, kb, max_new_tokens=2) for q in qs])
            times.append(time.perf_counter() - t)
    if name == "main":
        prefills(load())
    else:
        m = load() if name == "second_thread_after_main_loaded" else in_passing_thread(load)
        t = threading.Thread(target=prefills, args=(m,))
        t.start()
        t.join()
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6, help="prefills per process (median)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kb", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "openmp_threads.json")
    a = ap.parse_args(argv)
    if a.case:  # a child process: one case
        print(json.dumps(case(a.case, a.kb, a.repeats)))
        return 0
    sys.path.insert(0, str(REPO / "src"))
    from atlaskv.kb.store import KnowledgeBase
    from atlaskv.kb.triples import read_triples, write_triples

    work = Path(tempfile.mkdtemp(prefix="atlaskv-omp-"))
    facts = read_triples(REPO / "examples" / "demo" / "facts.tsv").triples
    write_triples(sorted(random.Random(0).sample(facts, 200)), work / "facts.tsv")
    KnowledgeBase.build(work / "facts.tsv", work / "kb")  # the KB the load benchmarks serve (200 demo facts)
    per_round = []
    for _ in range(a.rounds):
        row = {}
        for name in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", name, "--kb", str(work / "kb"),
                                  "--repeats", str(a.repeats)], check=True, capture_output=True, text=True)
            row[name] = round(json.loads(out.stdout.strip().splitlines()[-1]), 4)
        per_round.append(row)
        print(row, flush=True)
    med = {n: round(statistics.median(r[n] for r in per_round), 4) for n in CASES}
    result = {"what": "median seconds of one 8-answer prefill (200 demo facts, SmolLM2-135M + shipped adapter, "
                      "2-core CPU), by where torch ran first", "cases": CASES, "command": "python "
              "benchmarks/openmp_threads.py", "median_s": med, "per_round": per_round,
              "vs_main": {n: round(med[n] / med["main"], 2) for n in CASES}}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["vs_main"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
