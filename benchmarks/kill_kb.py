"""Crash test: SIGKILL `atlaskv kb build|add|remove|compact` at random points, then check the KB.

Each round starts one CLI writer as a subprocess on a small KB and kills it (SIGKILL, no cleanup runs):
  * mode "any":   after a random delay drawn over the whole run (start-up, reading, encoding, writing);
  * mode "write": after the first sign of writing (a new file under segments/ tombstones/ index/, a manifest
                  temp file, or the build's temp directory), plus a random delay within the write window
                  (first write -> manifest commit, +25 %) measured on an unkilled calibration run of the op.
After every kill the KB must open at a committed version: (version, triple set) is either the state before
the operation or the one it was making, every triple of that state is present and nothing else is served
(records, embedding rows and counts agree), `verify()` (sizes + sha256 of every file) passes, and the
orphans a killed writer left are not in the manifest. The next writer must clean them up.

    python benchmarks/kill_kb.py --kills 100 --seed 0           # the committed run (results/kill_kb.json)
    python benchmarks/kill_kb.py --kills 4 --no-calibrate ...   # the CI smoke run (tests/test_reliability.py)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlaskv.kb.triples import Triple, read_triples, write_triples  # noqa: E402
from atlaskv.kb.store import KBError, KnowledgeBase  # noqa: E402

OPS = ("build", "add", "remove", "compact")
# write windows used without calibration (seconds after the first sign of writing)
# (the committed run measured 0.51 / <0.05 / <0.05 / 0.17 s: benchmarks/results/kill_kb.json)
DEFAULT_WINDOW = {"build": 0.5, "add": 0.05, "remove": 0.05, "compact": 0.2}


def cli() -> list[str]:
    exe = Path(sys.executable).parent / "atlaskv"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from atlaskv.cli import app; app()"]


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_signs(kb: Path, op: str) -> set[str]:
    """Names whose appearance means the writer has started writing."""
    names = set()
    if op == "build":
        names |= {p.name for p in kb.parent.glob(f".{kb.name}.building-*")}
    for d in ("segments", "tombstones", "index"):
        if (kb / d).is_dir():
            names |= {f"{d}/{n}" for n in os.listdir(kb / d)}
    if (kb / ".manifest.json.tmp").exists():
        names.add(".manifest.json.tmp")
    return names


def manifest_stamp(kb: Path):
    """Changes when a new manifest is committed (os.replace, or a whole KB renamed into place)."""
    try:
        st = (kb / "manifest.json").stat()
        return (st.st_ino, st.st_mtime_ns)
    except OSError:
        return None


class Runner:
    def __init__(self, work: Path, seed: int, n_base: int):
        self.work, self.rng = work, random.Random(seed)
        facts = read_triples(REPO / "examples" / "demo" / "facts.tsv").triples
        self.rng.shuffle(facts)
        self.pool = facts[: n_base * 4]
        self.kb = work / "kb"
        self.n_base = n_base
        self.state: tuple[int, frozenset] | None = None
        self.inputs = 0

    def tsv(self, triples) -> Path:
        self.inputs += 1
        p = self.work / f"in-{self.inputs:04d}.tsv"
        write_triples(triples, p)
        return p

    def plan(self, op: str) -> tuple[list[str], tuple[int, frozenset]]:
        """The command for `op` on the current KB and the state it commits."""
        v, cur = self.state
        if op == "build":
            new = frozenset(self.rng.sample(self.pool, self.n_base))
            return (["kb", "build", str(self.tsv(sorted(new))), "--out", str(self.kb), "--overwrite"], (1, new))
        if op == "add":
            fresh = [t for t in self.pool if t not in cur]
            new = self.rng.sample(fresh, min(20, len(fresh)))
            dup = self.rng.sample(sorted(cur), min(2, len(cur)))  # known triples are skipped, not doubled
            return (["kb", "add", str(self.kb), str(self.tsv(new + dup))], (v + 1, cur | set(new)))
        if op == "remove":
            gone = self.rng.sample(sorted(cur), min(10, len(cur) - 1))
            unknown = Triple("nobody", "place of birth", "nowhere")
            return (["kb", "remove", str(self.kb), str(self.tsv(gone + [unknown]))], (v + 1, cur - set(gone)))
        return (["kb", "compact", str(self.kb)], (v + 1, cur))

    def run(self, args: list[str], kill_after: float | None = None, mode: str = "any", window: float = 0.0,
            op: str = "") -> dict:
        """Run one CLI writer; kill it per `mode`. Returns timings and whether it was killed."""
        before = write_signs(self.kb, op)
        stamp = manifest_stamp(self.kb)
        t0 = time.perf_counter()
        p = subprocess.Popen(cli() + args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first_sign = commit = None
        delay = None
        while p.poll() is None:
            now = time.perf_counter() - t0
            if first_sign is None and write_signs(self.kb, op) - before:
                first_sign = now
                if mode == "write" and kill_after is not None:
                    delay = now + self.rng.uniform(0, window)
            if commit is None and manifest_stamp(self.kb) != stamp:
                commit = now
            if kill_after is not None:
                due = kill_after if mode == "any" else delay
                if due is not None and now >= due:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    return {"killed": True, "at_s": round(now, 3), "first_write_s": first_sign, "commit_s": commit,
                            "rc": p.returncode}
            time.sleep(0.002)
        err = p.stderr.read().decode(errors="replace")
        return {"killed": False, "at_s": round(time.perf_counter() - t0, 3), "first_write_s": first_sign,
                "commit_s": commit, "rc": p.returncode, "stderr": err[-500:]}

    def observe(self, expected: list[tuple[int, frozenset]]) -> dict:
        """Open the KB as a reader would and check it is one of the `expected` committed states."""
        problems = []
        temps = sorted(p.name for p in self.kb.parent.glob(f".{self.kb.name}.*"))
        try:
            kb = KnowledgeBase.open(self.kb)
            return self._check(kb, expected, problems, temps)
        except Exception as e:  # noqa: BLE001 - any failure to read a committed state is the finding
            return {"ok": False, "problems": problems + [f"cannot read: {type(e).__name__}: {e}"], "temp_dirs": temps}

    def _check(self, kb, expected, problems, temps) -> dict:
        triples = kb.triples()
        got = (kb.version, frozenset(triples))
        which = [i for i, s in enumerate(expected) if s == got]
        if not which:
            close = min(expected, key=lambda s: len(s[1] ^ got[1]))
            problems.append(f"state (version {got[0]}, {len(got[1])} triples) is no committed state; nearest: "
                            f"version {close[0]}, missing {len(close[1] - got[1])}, extra {len(got[1] - close[1])}")
        if len(triples) != len(kb) or len(set(triples)) != len(triples):
            problems.append(f"{len(triples)} triples read, manifest says {len(kb)}")
        ids, keys, values = kb.embeddings()
        records = kb.records()
        if not (len(ids) == len(keys) == len(values) == records.num_rows == kb.num_entries):
            problems.append(f"rows disagree: ids {len(ids)}, keys {len(keys)}, records {records.num_rows}, "
                            f"manifest {kb.num_entries}")
        try:
            report = kb.verify()
        except KBError as e:
            problems.append(f"verify failed: {e}")
            report = {"orphans": []}
        listed = set(kb.manifest["files"])
        served = [o for o in report["orphans"] if o in listed]
        if served:
            problems.append(f"orphans listed in the manifest: {served}")
        return {"ok": not problems, "problems": problems, "state": "before" if which == [0] else "after" if which else None,
                "version": kb.version, "triples": len(triples), "orphans": len(report["orphans"]), "temp_dirs": temps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", type=int, default=100, help="triples in each built KB")
    ap.add_argument("--no-calibrate", action="store_true", help="use default write windows (CI)")
    ap.add_argument("--modes", default="any,write")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kill_kb.json")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir, removed)")
    a = ap.parse_args(argv)

    work = a.work or Path(tempfile.mkdtemp(prefix="atlaskv-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(work, a.seed, a.base)
    t_start = time.time()
    init = sorted(r.rng.sample(r.pool, a.base))
    res = r.run(["kb", "build", str(r.tsv(init)), "--out", str(r.kb)])
    assert res["rc"] == 0, res
    r.state = (1, frozenset(init))

    durations, windows = {}, dict(DEFAULT_WINDOW)
    if not a.no_calibrate:  # one unkilled run of each op: its duration and write window
        for op in OPS:
            args, after = r.plan(op)
            res = r.run(args, op=op)
            assert res["rc"] == 0, res
            obs = r.observe([after])
            assert obs["ok"] and obs["orphans"] == 0, obs
            r.state = after
            durations[op] = res["at_s"]
            if res["first_write_s"] is not None:
                # from the first file written to just past the commit (+25 %: the orphan clean-up after it);
                # what follows is interpreter teardown, where a kill tests nothing new
                end = res["commit_s"] if res["commit_s"] is not None else res["at_s"]
                windows[op] = round(max(0.05, 1.25 * (end - res["first_write_s"])), 3)

    modes = a.modes.split(",")
    kills, failures, completed = [], 0, 0
    i = 0
    per_op = max(1, a.kills // len(OPS))  # and at least this many kills of each op (a fast op may finish first)

    def enough() -> bool:
        return len(kills) >= a.kills and all(sum(k["op"] == op for k in kills) >= per_op for op in OPS)

    while not enough() and i < 10 * a.kills:
        op, mode = OPS[i % len(OPS)], modes[(i // len(OPS)) % len(modes)]
        if len(kills) >= a.kills and sum(k["op"] == op for k in kills) >= per_op:
            i += 1
            continue
        i += 1
        args, after = r.plan(op)
        before = r.state
        kill_after = r.rng.uniform(0, durations.get(op, 8.0)) if mode == "any" else 0.0
        res = r.run(args, kill_after=kill_after, mode=mode, window=windows[op], op=op)
        obs = r.observe([before, after])
        if not res["killed"]:
            completed += 1  # finished before the kill came: must be the new state, with no orphans left
            if res["rc"] != 0 or obs.get("state") != "after" or obs.get("orphans"):
                obs["ok"] = False
                obs["problems"].append(f"unkilled run: rc {res['rc']}, state {obs.get('state')}, "
                                       f"{obs.get('orphans')} orphans; {res.get('stderr', '')}")
        else:
            kills.append({"op": op, "mode": mode, "kill_at_s": res["at_s"], "first_write_s": res["first_write_s"],
                          "committed_before_kill": res["commit_s"] is not None,
                          **{k: obs.get(k) for k in ("ok", "state", "version", "triples", "orphans", "temp_dirs",
                                                     "problems")}})
        if not obs["ok"]:
            failures += 1
            print(f"FAIL {op}/{mode}: {obs['problems']}", flush=True)
            break  # the expected states are unknown from here on
        r.state = before if obs["state"] == "before" else after
        print(f"{len(kills):3d} {op:8s} {mode:5s} killed={res['killed']!s:5s} at {res['at_s']:6.2f}s -> "
              f"{obs['state']:6s} v{obs['version']} {obs['triples']} triples, {obs['orphans']} orphans", flush=True)

    # the next writer after all that: completes, cleans every orphan and stale temp dir
    args, after = r.plan("add")
    res = r.run(args, op="add")
    final = r.observe([after])
    final_clean = res["rc"] == 0 and final["ok"] and final["orphans"] == 0
    r.state = after
    args, after = r.plan("build")
    res = r.run(args, op="build")
    final_build = r.observe([after])
    final_clean = final_clean and res["rc"] == 0 and final_build["ok"] and final_build["temp_dirs"] == []

    by = lambda key: {k: sum(1 for x in kills if x[key] == k) for k in sorted({x[key] for x in kills})}  # noqa: E731
    out = {
        "what": "SIGKILL of atlaskv kb build/add/remove/compact subprocesses at random points; after each kill the "
                "KB must open at a committed (version, triple set) with verify() passing and no orphan served",
        "command": "python benchmarks/kill_kb.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": a.seed, "base_triples": a.base, "kills": len(kills), "failures": failures,
        "unkilled_runs": completed, "kills_by_op": by("op"), "kills_by_mode": by("mode"),
        "outcome_after_kill": by("state"),
        "kills_leaving_orphans": sum(1 for k in kills if k["orphans"]),
        "kills_leaving_temp_dirs": sum(1 for k in kills if k["temp_dirs"]),
        "kills_after_first_write": sum(1 for k in kills if k["first_write_s"] is not None),
        "kills_between_first_write_and_commit": sum(1 for k in kills if k["first_write_s"] is not None
                                                    and not k["committed_before_kill"]),
        "calibration_s": durations, "write_window_s": windows,
        "final_writer_cleaned_up": final_clean,
        "seconds": round(time.time() - t_start, 1),
        "runs": kills,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if failures == 0 and final_clean and enough() else 1


if __name__ == "__main__":
    sys.exit(main())
