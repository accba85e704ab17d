"""The five methods side by side: prints the table of docs/results.md and draws benchmarks/results/methods.png.

Reads benchmarks/results/methods/<set>_<method>[_<sizes>].json (bash benchmarks/run_methods.sh); kblam (flat)
rows come from the committed grounding_<set>_flat.json runs (same seed, questions and KBs).
    .venv/bin/python benchmarks/summarize_methods.py
"""
import json
from pathlib import Path

R = Path(__file__).parent / "results"
SETS = {"fb15k": "fb15k", "pararel": "pararel", "fb15k-para_samehead": "fb15k-para (same-head)"}
METHODS = ("atlaskv", "kblam", "rag", "icl", "zeroshot")


def load(set_key: str, method: str) -> list[dict]:
    """Rows of every run of this set and method: <set>_<method>.json and extra sizes run separately
    (<set>_<method>_<sizes>.json, e.g. atlaskv at 10 entries)."""
    if method == "kblam":
        files = [R / f"grounding_{set_key}_flat.json"]
    else:
        files = [R / f"methods/{set_key}_{method}.json", *sorted((R / "methods").glob(f"{set_key}_{method}_*.json"))]
    return [r for f in files if f.is_file() for r in json.loads(f.read_text())["results"]]


def cell(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SETS), figsize=(14, 7), sharex=True)
    print("| set | KB size | " + " | ".join(f"{m} acc1 / EM" for m in METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for col, (key, label) in enumerate(SETS.items()):
        rows = {m: {r["kb_size"]: r for r in load(key, m)} for m in METHODS}
        for size in sorted({s for m in rows.values() for s in m}):
            cells = []
            for m in METHODS:
                r = rows[m].get(size)
                longest = [s for s, x in rows[m].items() if x.get("status") == "too_long" and s < size]
                if r is None and longest:  # a bigger KB than one that already overflowed the window
                    cells.append("too_long")
                elif r is None:
                    cells.append("")
                elif r.get("status", "ok") != "ok":
                    cells.append(r["status"])
                else:
                    cells.append(f"{cell(r['acc1'])} / {cell(r['answer_em'])}")
            print(f"| {label} | {size:,} | " + " | ".join(cells) + " |")
        for m in METHODS:
            ok = sorted((s, r) for s, r in rows[m].items() if r.get("status", "ok") == "ok")
            if not ok:
                continue
            xs = [s for s, _ in ok]
            if any(r["acc1"] is not None for _, r in ok):
                axes[0, col].plot(xs, [r["acc1"] for _, r in ok], "o-", label=m)
            axes[1, col].plot(xs, [r["answer_em"] for _, r in ok], "o-", label=m)
        axes[0, col].set_title(label)
    for ax, ylabel in ((axes[0, 0], "ACC@1 (attention / retriever)"), (axes[1, 0], "answer exact-match")):
        ax.set_ylabel(ylabel)
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("KB size (triples)")
    axes[0, 0].legend()
    axes[1, 0].legend()
    fig.suptitle("SmolLM2-135M + the shipped adapter, seed 0: 500 questions (ACC), answers for 100 of them")
    fig.tight_layout()
    fig.savefig(R / "methods.png", dpi=110)


if __name__ == "__main__":
    main()
