"""Load and abuse test of the real server: `atlaskv serve` (default model, shipped adapter) on a small KB,
localhost only, bounded in requests and time.

N concurrent clients x M requests each, mixing plain asks, streamed asks, KB adds and KB deletes, plus a
few hostile requests (wrong key, malformed JSON) that must get their 4xx. Counted: status codes per kind
(any 5xx is a failure; 503/429 is the designed answer to overload), latencies, and, at the end, that no
update was lost: every triple a 200 said was added is in the KB, every one a 200 said was removed is not,
and the KB on disk verifies. The server's RSS is sampled all along (peak, and growth after warm-up).

    python benchmarks/load_server.py                       # 20 clients x 50 requests (results/load_server.json)
    python benchmarks/load_server.py --clients 4 --requests 5 --out /tmp/x.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlaskv.kb.triples import Triple, read_triples, write_triples  # noqa: E402
from atlaskv.kb.store import KnowledgeBase  # noqa: E402

MIX = {"ask": 0.35, "stream": 0.25, "add": 0.2, "delete": 0.15, "hostile": 0.05}
MIXES = {"mixed": MIX, "chat": {"ask": 0.6, "stream": 0.4}}  # --mix: chat only measures the answering alone


def cli() -> list[str]:
    exe = Path(sys.executable).parent / "atlaskv"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from atlaskv.cli import app; app()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Memory(threading.Thread):
    """Samples the server's RSS every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.proc, self.every, self.samples, self.stop = psutil.Process(pid), every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append((time.time(), self.proc.memory_info().rss))
            except psutil.Error:
                return
            self.stop.wait(self.every)


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Client(threading.Thread):
    def __init__(self, idx: int, url: str, key: str, n: int, base: list[Triple], own_base: list[Triple], seed: int,
                 max_tokens: int, deadline: float, mix: dict | None = None):
        super().__init__(daemon=True)
        self.mix = mix or MIX
        self.idx, self.url, self.key, self.n = idx, url, key, n
        self.base, self.own_base = base, list(own_base)
        self.rng = random.Random(seed * 1000 + idx)
        self.max_tokens, self.deadline = max_tokens, deadline
        self.results: list[dict] = []
        self.added: set[Triple] = set()     # a 200 said added (and not removed since)
        self.removed: set[Triple] = set()   # a 200 said removed
        self.live_added: list[Triple] = []
        self.counter = 0
        self.n_added = 0

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def question(self) -> str:
        t = self.rng.choice(self.base)
        return f"What is the {t.relation} of {t.head}?"

    def run(self):
        with httpx.Client(base_url=self.url, timeout=600) as c:
            for _ in range(self.n):
                if time.time() > self.deadline:
                    break
                kind = self.rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
                t0 = time.perf_counter()
                rec = {"kind": kind, "started": round(time.time(), 3)}
                try:
                    rec.update(getattr(self, f"do_{kind}")(c))
                except httpx.HTTPError as e:
                    rec.update(status="transport_error", error=f"{type(e).__name__}: {e}")
                rec["seconds"] = round(time.perf_counter() - t0, 3)
                self.results.append(rec)

    def chat_body(self, stream: bool) -> dict:
        return {"model": "atlaskv", "messages": [{"role": "user", "content": self.question()}],
                "max_tokens": self.max_tokens, "stream": stream}

    def do_ask(self, c) -> dict:
        r = c.post("/v1/chat/completions", json=self.chat_body(False), headers=self.headers())
        ok = r.status_code != 200 or ("choices" in r.json() and "atlaskv" in r.json())
        tokens = r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 and ok else None
        return {"status": r.status_code, "well_formed": ok, "completion_tokens": tokens}

    def do_stream(self, c) -> dict:
        with c.stream("POST", "/v1/chat/completions", json=self.chat_body(True), headers=self.headers()) as r:
            if r.status_code != 200:
                r.read()
                return {"status": r.status_code}
            chunks, done, final, error = 0, False, None, None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    error = obj["error"]
                chunks += 1
                if obj.get("atlaskv"):
                    final = obj
            return {"status": 200, "chunks": chunks, "well_formed": done and final is not None and error is None,
                    **({"stream_error": error} if error else {})}

    def do_add(self, c) -> dict:
        self.counter += 1
        new = [Triple(f"load client {self.idx} entity {self.counter}", "place of birth", f"city {self.counter % 13}")]
        if self.rng.random() < 0.3:  # sometimes a batch, sometimes with a known triple in it
            self.counter += 1
            new.append(Triple(f"load client {self.idx} entity {self.counter}", "country", "Atlantis"))
        body = {"triples": [t._asdict() for t in new]}
        r = c.post("/v1/kb/triples", json=body, headers=self.headers())
        if r.status_code == 200:
            if r.json()["added"] != len(new):
                return {"status": 200, "well_formed": False, "error": f"added {r.json()['added']} of {len(new)}"}
            self.added |= set(new)
            self.live_added += new
            self.n_added += len(new)
        return {"status": r.status_code}

    def do_delete(self, c) -> dict:
        pool = self.live_added if self.live_added and (self.rng.random() < 0.7 or not self.own_base) else self.own_base
        if not pool:
            return self.do_add(c)
        t = pool.pop(self.rng.randrange(len(pool)))
        r = c.request("DELETE", "/v1/kb/triples", json={"triples": [t._asdict()]}, headers=self.headers())
        if r.status_code == 200:
            if r.json()["removed"] != 1:
                return {"status": 200, "well_formed": False, "error": f"removed {r.json()['removed']} of 1"}
            self.added.discard(t)
            self.removed.add(t)
        else:
            pool.append(t)  # not applied: still there
        return {"status": r.status_code}

    def do_hostile(self, c) -> dict:
        which = self.rng.choice(["wrong_key", "no_key", "query_key", "bad_json", "huge_tokens"])
        if which == "wrong_key":
            r = c.post("/v1/kb/triples", json={"triples": [{"head": "evil", "relation": "r", "tail": "t"}]},
                       headers={"Authorization": "Bearer sk-not-the-key"})
        elif which == "no_key":
            r = c.request("DELETE", "/v1/kb/triples", json={"triples": [self.base[0]._asdict()]})
        elif which == "query_key":
            r = c.get(f"/health?api_key={self.key}")
        elif which == "bad_json":
            r = c.post("/v1/chat/completions", content=b'{"messages": [', headers=self.headers())
        else:
            r = c.post("/v1/chat/completions", json={**self.chat_body(False), "max_tokens": 10**6},
                       headers=self.headers())
        expect = {"wrong_key": 401, "no_key": 401, "query_key": 401, "bad_json": 400, "huge_tokens": 422}[which]
        return {"status": r.status_code, "attack": which, "well_formed": r.status_code == expect
                and "error" in r.json()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kb-triples", type=int, default=200)
    ap.add_argument("--kb-from", type=Path, default=None,
                    help="start from a copy of this KB (e.g. the scale benchmark's build/bench/kb-1000000) with the "
                         "--kb-triples demo facts added to it, instead of a KB of the demo facts alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-queue", type=int, default=64, help="passed to atlaskv serve")
    ap.add_argument("--max-seconds", type=float, default=1500, help="clients stop starting requests after this")
    ap.add_argument("--mix", choices=sorted(MIXES), default="mixed", help="request kinds: mixed (asks, streams, "
                    "KB adds / deletes, hostile) or chat (asks and streams only)")
    ap.add_argument("--max-batch", type=int, default=None, help="passed to atlaskv serve (default: its own)")
    ap.add_argument("--server-src", type=Path, default=None,
                    help="serve the atlaskv package in this src folder instead (another commit's checkout: "
                         "benchmarks/serve_batching.py runs the serial server this way)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load_server.json")
    ap.add_argument("--requests-out", type=Path, default=None,
                    help="also write every request (kind, start, seconds, status, answer tokens) as JSONL")
    a = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="atlaskv-load-"))
    rng = random.Random(a.seed)
    facts = read_triples(REPO / "examples" / "demo" / "facts.tsv").triples
    base = sorted(rng.sample(facts, a.kb_triples))
    write_triples(base, work / "base.tsv")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if a.kb_from is None:
        subprocess.run(cli() + ["kb", "build", str(work / "base.tsv"), "--out", str(work / "kb")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    else:  # a big KB: the asked (and deleted) facts are live additions to it
        shutil.copytree(a.kb_from, work / "kb")
        subprocess.run(cli() + ["kb", "add", str(work / "kb"), str(work / "base.tsv")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    key = "sk-load-" + secrets.token_hex(16)
    port = free_port()
    log = open(work / "server.log", "wb")
    t_boot = time.time()
    serve = cli() if a.server_src is None else [sys.executable, "-c", "from atlaskv.cli import app; app()"]
    server_env = {**env, "ATLASKV_API_KEY": key}
    if a.server_src is not None:
        server_env["PYTHONPATH"] = str(a.server_src.resolve())
    server = subprocess.Popen(serve + ["serve", "--kb", str(work / "kb"), "--host", "127.0.0.1", "--port", str(port),
                                       "--max-tokens", "64", "--max-queue", str(a.max_queue)]
                              + ([] if a.max_batch is None else ["--max-batch", str(a.max_batch)]),
                              env=server_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {(work / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t_boot > 600:
                raise RuntimeError("server did not come up in 600 s")
            time.sleep(0.5)
        boot_s = time.time() - t_boot
        mem = Memory(server.pid)
        mem.start()
        time.sleep(0.5)
        rss_idle = mem.samples[-1][1]

        own = [base[i::a.clients] for i in range(a.clients)]  # each client may delete only its own base triples
        t0 = time.time()
        clients = [Client(i, url, key, a.requests, base, own[i][:3], a.seed, a.max_tokens, t0 + a.max_seconds,
                          MIXES[a.mix]) for i in range(a.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.time() - t0
        health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
        hwm = vm_hwm(server.pid)
        mem.stop.set()
        mem.join()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    results = [r for c in clients for r in c.results]
    added = set().union(*(c.added for c in clients))
    removed = set().union(*(c.removed for c in clients))
    kb = KnowledgeBase.open(work / "kb", verify=True)
    on_disk = set(kb.triples())
    copied = set(KnowledgeBase.open(a.kb_from).triples()) if a.kb_from is not None else set()
    expected = (copied | set(base) | added) - removed
    lost_adds = sorted(added - on_disk)
    lost_deletes = sorted(removed & on_disk)
    unexpected = sorted(on_disk - expected)

    status = defaultdict(Counter)
    for r in results:
        status[r["kind"]][str(r["status"])] += 1
    codes = Counter(str(r["status"]) for r in results)
    n5xx = sum(v for k, v in codes.items() if k.startswith("5") and k not in ("503",))
    n503 = codes.get("503", 0) + codes.get("429", 0)
    malformed = [r for r in results if r.get("well_formed") is False]
    transport = [r for r in results if r["status"] == "transport_error"]
    lat = defaultdict(list)
    for r in results:
        if r["status"] == 200:
            lat[r["kind"]].append(r["seconds"])
    samples = mem.samples
    warm = [rss for t, rss in samples if t >= t0 + 0.2 * wall] or [rss_idle]
    out = {
        "what": "real `atlaskv serve` (SmolLM2-135M-Instruct + shipped adapter) on localhost; concurrent clients "
                "mixing asks, streamed asks, KB adds/deletes and a few hostile requests",
        "command": "python benchmarks/load_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clients": a.clients, "requests_per_client": a.requests, "max_tokens": a.max_tokens,
        "kb_triples_at_start": len(base), "max_queue": a.max_queue, "seed": a.seed,
        "server_src": str(a.server_src) if a.server_src else "this checkout", "max_batch": a.max_batch,
        "mix": MIXES[a.mix],
        "requests_sent": len(results), "wall_s": round(wall, 1), "server_boot_s": round(boot_s, 1),
        "requests_per_s": round(len(results) / wall, 2),
        "status_codes": dict(sorted(codes.items())),
        "status_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(status.items())},
        "server_errors_5xx_excluding_503": n5xx, "overload_503_429": n503, "transport_errors": len(transport),
        "malformed_responses": len(malformed),
        "attacks": dict(Counter(r["attack"] for r in results if "attack" in r)),
        "latency_s": {k: {"n": len(v), "p50": round(statistics.median(v), 3),
                          "p95": round(sorted(v)[min(len(v), math.ceil(0.95 * len(v))) - 1], 3), "max": round(max(v), 3)}
                      for k, v in sorted(lat.items()) if v},
        "writes": [[round(r["started"] - t0, 2), r["kind"], r["seconds"]] for r in sorted(results, key=lambda r: r["started"])
                   if r["kind"] in ("add", "delete") and r["status"] == 200],  # [start (s into the run), kind, seconds]
        "updates": {"triples_added_by_200s": sum(c.n_added for c in clients), "still_added": len(added),
                    "removed_by_200s": len(removed), "lost_adds": len(lost_adds), "lost_deletes": len(lost_deletes),
                    "unexpected_triples": len(unexpected), "kb_triples_at_end": len(on_disk),
                    "expected_triples_at_end": len(expected), "health_triples": health["kb"]["triples"],
                    "kb_version_at_end": kb.version, "kb_verified": True},
        "memory": {"rss_idle_mb": round(rss_idle / 2**20, 1),
                   "rss_peak_sampled_mb": round(max(s[1] for s in samples) / 2**20, 1),
                   "vm_hwm_mb": round(hwm / 2**20, 1) if hwm else None,
                   "rss_after_warmup_min_mb": round(min(warm) / 2**20, 1),
                   "rss_after_warmup_max_mb": round(max(warm) / 2**20, 1),
                   "rss_end_mb": round(samples[-1][1] / 2**20, 1), "samples": len(samples),
                   "rss_max_by_tenth_of_run_mb": [
                       round(max([rss for t, rss in samples if t0 + i * wall / 10 <= t < t0 + (i + 1) * wall / 10]
                                 or [0]) / 2**20, 1) for i in range(10)]},
        "examples_of_problems": (malformed + transport)[:10] + [{"lost_add": list(t)} for t in lost_adds[:5]]
                                + [{"lost_delete": list(t)} for t in lost_deletes[:5]],
    }
    ok = (n5xx == 0 and not transport and not malformed and not lost_adds and not lost_deletes and not unexpected
          and health["kb"]["triples"] == len(on_disk) and len(results) == a.clients * a.requests)
    out["all_held"] = ok
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    if a.requests_out is not None:
        a.requests_out.write_text("".join(json.dumps(r) + "\n" for r in sorted(results, key=lambda r: r["started"])))
    print(json.dumps({k: v for k, v in out.items() if k != "examples_of_problems"}, indent=1))
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept for inspection: {work} (server.log, kb/)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
