"""Live KB writes on a big KB: `KnowledgeBase.add` and `remove` of one triple, on a copy of the KB (the
original is never written), 3 times each after one warm-up add; prints seconds per call and writes JSON.

    python benchmarks/bench_kb_writes.py build/bench/kb-1000000 [--out benchmarks/results/kb_writes_1e6.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlaskv.kb.store import KnowledgeBase  # noqa: E402
from atlaskv.kb.triples import Triple  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kb", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="atlaskv-writes-") as tmp:
        copy = Path(tmp) / "kb"
        shutil.copytree(a.kb, copy)
        kb = KnowledgeBase.open(copy)
        kb.add([Triple("warm-up entity", "place of birth", "city 1")])  # loads the encoder
        adds, removes = [], []
        for i in range(3):
            t = Triple(f"timing entity {i}", "place of birth", "city 3")
            s = time.perf_counter()
            kb.add([t])
            adds.append(round(time.perf_counter() - s, 3))
            s = time.perf_counter()
            kb.remove([t])
            removes.append(round(time.perf_counter() - s, 3))
        out = {"kb": str(a.kb), "live_triples": len(kb), "add_one_s": adds, "remove_one_s": removes,
               "command": "python benchmarks/bench_kb_writes.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
