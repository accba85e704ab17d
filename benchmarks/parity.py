"""Behaviour parity across a refactor: the same questions, KBs and seed give the same answers, citations and
grounding numbers before and after.

    python benchmarks/parity.py record OUT.json [--questions 48 --answers 24 --asks 8]
    python benchmarks/parity.py compare BEFORE.json AFTER.json

`record` runs, on the three evaluation sets (fb15k, pararel, fb15k-para with same-head distractors) at KB sizes
100 and 1,000, pruned (HiKVP) and flat:
  * `atlaskv eval grounding` through the CLI (acc1, acc5, pruning recall, answer EM with and without gold,
    refusal fields), and every token id that generate() produced during it;
  * `AtlasKV.ask` on a KB directory built with `KnowledgeBase.build` from the questions' gold facts plus seeded
    distractors: answer text, citations (triple and weight) and support, pruned and flat.
It only uses the documented CLI and Python API, so the same file runs against the code before and after.
`compare` exits 1 and names every difference (weights may differ by 1e-5 relative, nothing else may) and
reports how many floats are not bit-identical. Keys of removed options are listed in REMOVED and skipped.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = (("fb15k", "random"), ("pararel", "random"), ("fb15k-para", "same-head"))
SIZES = (100, 1000)
# result fields of options removed on purpose: eval grounding's "scale_mode" (the length-correction mode;
# the one left is the shipped adapter's "cap", docs/architecture.md)
REMOVED = {"scale_mode"}


def shared_dir() -> Path:
    return Path(os.environ.get("ATLASKV_SHARED") or ROOT.parent / "shared")


class GenerateRecorder:
    """Wraps transformers' generate() so every produced token id is kept, whichever code path calls it."""

    def __init__(self):
        from transformers.generation.utils import GenerationMixin

        self.calls: list[list[list[int]]] = []
        original = GenerationMixin.generate
        recorder = self

        def generate(model, inputs=None, *args, **kwargs):
            out = original(model, inputs, *args, **kwargs)
            ids = out if inputs is None else out[:, inputs.shape[1]:]
            recorder.calls.append(ids.tolist())
            return out

        GenerationMixin.generate = generate

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def run_eval(set_dir: Path, distractors: str, prune: bool, n_q: int, n_ans: int, out: Path) -> dict:
    from atlaskv.cli import app

    args = ["eval", "grounding", "--set", str(set_dir), "--sizes", ",".join(map(str, SIZES)), "--questions",
            str(n_q), "--answer-questions", str(n_ans), "--distractors", distractors, "--seed", "0",
            "--refuse-below", "3.23", "--json", str(out)] + ([] if prune else ["--no-prune"])
    try:
        app(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    res = json.loads(out.read_text())
    for r in res["results"]:
        for k in ("seconds", "index_seconds"):
            r.pop(k, None)
    return res


def load_api():
    try:
        from atlaskv import AtlasKV, KnowledgeBase
    except ImportError:  # before the refactor only atlaskv.model had AtlasKV
        from atlaskv import KnowledgeBase
        from atlaskv.model import AtlasKV
    return AtlasKV, KnowledgeBase


def run_asks(akv, KnowledgeBase, set_dir: Path, n_asks: int, tmp: Path) -> list:
    triples = [tuple(line.rstrip("\n").split("\t")) for line in open(set_dir / "triples.tsv", encoding="utf-8")]
    questions = [json.loads(line) for line in open(set_dir / "questions.jsonl", encoding="utf-8")]
    rng = random.Random(0)
    asked = rng.sample(questions, n_asks)
    gold = [(q["head"], q["relation"], q["tail"]) for q in asked]
    rows = []
    for size in SIZES:
        facts = list(dict.fromkeys(gold))
        seen = set(facts)
        for t in rng.sample(triples, min(len(triples), size * 2)):
            if len(facts) >= size:
                break
            if t not in seen:
                facts.append(t)
                seen.add(t)
        tsv = tmp / f"{set_dir.name}-{size}.tsv"
        tsv.write_text("".join("\t".join(t) + "\n" for t in facts), encoding="utf-8")
        kb = KnowledgeBase.build(tsv, tmp / f"kb-{set_dir.name}-{size}")
        for prune in (True, False):
            for q in asked:
                a = akv.ask(q["question"], kb, prune=prune)
                rows.append({"set": set_dir.name, "kb_size": size, "pruned": prune, "question": q["question"],
                             "answer": a.text, "support": a.support, "kb_attention_mass": a.kb_attention_mass,
                             "citations": [[list(t), w] for t, w in a.citations]})
    return rows


def record(out: Path, n_q: int, n_ans: int, n_asks: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rec = GenerateRecorder()
    AtlasKV, KnowledgeBase = load_api()
    result = {"eval": [], "asks": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, distractors in SETS:
            for prune in (True, False):
                res = run_eval(shared_dir() / "eval" / name, distractors, prune, n_q, n_ans, tmp / "eval.json")
                result["eval"].append({"set": name, "pruned": prune, "json": res, "generated": rec.take()})
                print(f"eval {name} pruned={prune}: {time.time() - t0:.0f} s", flush=True)
        akv = AtlasKV.from_pretrained()
        for name, _ in SETS:
            result["asks"] += run_asks(akv, KnowledgeBase, shared_dir() / "eval" / name, n_asks, tmp)
            print(f"asks {name}: {time.time() - t0:.0f} s", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def diff(a, b, path: str, out: list, rel: float = 1e-5) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ("started", "seconds") or k in REMOVED:
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k in b else 'before'}")
            else:
                diff(a[k], b[k], f"{path}.{k}", out, rel)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items before, {len(b)} after")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", out, rel)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or abs(a - b) <= rel * max(abs(a), abs(b))):
            out.append(f"{path}: {a!r} before, {b!r} after")
    elif a != b:
        out.append(f"{path}: {a!r} before, {b!r} after")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    problems: list[str] = []
    diff(a, b, "", problems)
    inexact: list[str] = []
    diff(a, b, "", inexact, rel=0.0)
    n_tokens = sum(len(s) for e in a["eval"] for call in e["generated"] for s in call)
    print(f"{len(a['eval'])} eval runs ({n_tokens} generated tokens), {len(a['asks'])} asks compared; "
          f"{len(inexact) - len(problems)} floats equal to 1e-5 but not bit-identical")
    for p in problems[:50]:
        print("DIFF", p)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--questions", type=int, default=48)
    r.add_argument("--answers", type=int, default=24)
    r.add_argument("--asks", type=int, default=8)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "record":
        record(a.out, a.questions, a.answers, a.asks)
        return 0
    return compare(a.before, a.after)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
