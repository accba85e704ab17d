"""The serial server against the batched one, side by side in one run (issue 23): `atlaskv serve` as it was
before continuous batching (a git worktree of BASELINE_REF, same venv) and as it is, under the same mixed load
(benchmarks/load_server.py: asks, streamed asks, KB adds / deletes, hostile requests) at 1, 5 and 20 clients,
and asks and streamed asks only at 20 clients and at 1 client (30 requests); 32-token answers, on the demo KB. Then the batched server alone
for 20 x 50 mixed requests (lost / phantom updates over 1,000 mixed requests).

    python benchmarks/serve_batching.py                   # results/serve_batching.json + .png
    python benchmarks/serve_batching.py --clients 1,5 --requests 4 --out /tmp/x.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import load_server  # noqa: E402

BASELINE_REF = "c3ba57f"  # the last commit of the serial server (one lock around the model and the KB)


def worktree(ref: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"atlaskv-serial-{ref}"
    if not (path / "src" / "atlaskv").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True)
    return path / "src"


def headline(r: dict) -> dict:
    lat = r["latency_s"]
    return {"requests": r["requests_sent"], "wall_s": r["wall_s"], "requests_per_s": r["requests_per_s"],
            "ask_p50_s": lat.get("ask", {}).get("p50"), "ask_p95_s": lat.get("ask", {}).get("p95"),
            "stream_p50_s": lat.get("stream", {}).get("p50"),
            "add_p50_s": lat.get("add", {}).get("p50"), "add_p95_s": lat.get("add", {}).get("p95"),
            "delete_p95_s": lat.get("delete", {}).get("p95"),
            "server_errors_5xx": r["server_errors_5xx_excluding_503"], "overload_503": r["overload_503_429"],
            "lost_adds": r["updates"]["lost_adds"], "lost_deletes": r["updates"]["lost_deletes"],
            "phantom_triples": r["updates"]["unexpected_triples"], "rss_peak_mb": r["memory"]["rss_peak_sampled_mb"],
            "vm_hwm_mb": r["memory"]["vm_hwm_mb"], "all_held": r["all_held"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,5,20")
    ap.add_argument("--requests", type=int, default=10, help="per client, in the side-by-side runs")
    ap.add_argument("--long-requests", type=int, default=50, help="per client, batched server alone at the most "
                                                                     "clients (0: skip)")
    ap.add_argument("--single-requests", type=int, default=30, help="one chat-only client, both servers (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--baseline-ref", default=BASELINE_REF)
    ap.add_argument("--kb-from", type=Path, default=None,
                    help="serve a copy of this KB plus the demo facts (e.g. build/bench/kb-1000000) instead of the "
                         "demo KB alone")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_batching.json")
    a = ap.parse_args(argv)

    serial_src = worktree(a.baseline_ref)
    clients = [int(c) for c in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="atlaskv-batching-"))
    runs = []
    # the chat-only runs: at the most clients, and one client for longer (its latency is the target's baseline)
    plan = [("mixed", n, a.requests) for n in clients] + [("chat", clients[-1], a.requests)] \
        + ([("chat", 1, a.single_requests)] if a.single_requests else [])
    for mix, n, requests in plan:
        for server, src in (("serial", serial_src), ("batched", None)):
            out = tmp / f"{server}_{mix}_{n}.json"
            args = ["--clients", str(n), "--requests", str(requests), "--max-tokens", str(a.max_tokens),
                    "--mix", mix, "--out", str(out)] + (["--server-src", str(src)] if src else []) \
                + (["--kb-from", str(a.kb_from)] if a.kb_from else [])
            print(f"== {server}, {mix}, {n} clients", flush=True)
            load_server.main(args)
            runs.append({"server": server, "mix": mix, "clients": n, **headline(json.loads(out.read_text()))})
    long = None
    if a.long_requests:
        out = tmp / "batched_long.json"
        print(f"== batched, {clients[-1]} clients x {a.long_requests}", flush=True)
        load_server.main(["--clients", str(clients[-1]), "--requests", str(a.long_requests),
                          "--max-tokens", str(a.max_tokens), "--out", str(out)]
                         + (["--kb-from", str(a.kb_from)] if a.kb_from else []))
        long = {"server": "batched", "clients": clients[-1], **headline(json.loads(out.read_text()))}

    def pick(server, mix, n):
        return next(r for r in runs if r["server"] == server and r["mix"] == mix and r["clients"] == n)

    ratios = {}
    for mix, n in sorted({(r["mix"], r["clients"]) for r in runs}):
        s, b = pick("serial", mix, n), pick("batched", mix, n)
        ratios[f"{mix}_{n}"] = {"throughput_x": round(b["requests_per_s"] / s["requests_per_s"], 2),
                          "ask_p50_ratio": round(b["ask_p50_s"] / s["ask_p50_s"], 3) if s["ask_p50_s"] else None,
                          "rss_peak_ratio": round(b["rss_peak_mb"] / s["rss_peak_mb"], 3)}
    result = {"what": "the serial server (commit " + a.baseline_ref + ") against the batched one, same load, one run; "
                      "2-core CPU, SmolLM2-135M + shipped adapter, " + (f"{a.kb_from} + 200 demo facts" if a.kb_from
                                                                           else "demo KB (200 facts at start)"),
              "command": "python benchmarks/serve_batching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "max_tokens": a.max_tokens, "requests_per_client": a.requests,
              "runs": runs, "batched_vs_serial": ratios, "batched_1000_mixed": long}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, a.out.with_suffix(".png"))
    print(json.dumps({"batched_vs_serial": ratios, "batched_1000_mixed": long}, indent=1))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for server, style in (("serial", "o--"), ("batched", "s-")):
        rs = [r for r in result["runs"] if r["server"] == server and r["mix"] == "mixed"]
        xs = [r["clients"] for r in rs]
        axes[0].plot(xs, [r["requests_per_s"] for r in rs], style, label=server)
        axes[1].plot(xs, [r["ask_p50_s"] for r in rs], style, label=server)
        axes[2].plot(xs, [r["add_p95_s"] or 0 for r in rs], style, label=server)
    for ax, title in zip(axes, ("requests / s", "ask latency p50 (s)", "KB add latency p95 (s)")):
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"atlaskv serve, serial vs continuous batching ({result['max_tokens']}-token answers, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
