"""Training plots from committed logs: ACC@1 vs step per variant, and the shuffled-values control.

    .venv/bin/python benchmarks/plot_training.py
"""
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHIPPED = REPO / "src" / "atlaskv" / "adapters" / "default" / "train_log.jsonl"
RUNS = {
    "question input, batch 32, H100 (shipped)": SHIPPED,
    "question input, batch 8, 2 CPU cores (stopped at 653 steps)": RESULTS / "training_logs/cpu_question_input_b8.jsonl",
    "question input, batch 32, shuffled values (control)":
        RESULTS / "training_logs/gpu_question_input_b32_shuffled_values.jsonl",
}


def load(p):
    return [json.loads(l) for l in open(p, encoding="utf-8") if l.strip()]


def smooth(xs, k=50):
    out, acc = [], []
    for x in xs:
        acc = (acc + [x])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def main() -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for label, p in RUNS.items():
        pts = [(r["step"], r["val_acc1_kb100"]) for r in load(p) if "val_acc1_kb100" in r]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation ACC@1 (KB of 100, train distribution)")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title("ACC@1 vs step per training variant")
    fig.tight_layout()
    fig.savefig(RESULTS / "training_variants_acc1.png", dpi=110)

    correct, shuffled = load(SHIPPED), load(RUNS["question input, batch 32, shuffled values (control)"])
    n = max(r["step"] for r in shuffled)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for rows, label in ((correct, "correct key/value pairs"), (shuffled, "shuffled: a wrong value behind every key")):
        rows = [r for r in rows if r["step"] <= n]
        for ax, key in zip(axes, ("answer_loss", "retrieval_loss")):
            ax.plot([r["step"] for r in rows], smooth([r[key] for r in rows]), label=label)
    axes[0].set_title("answer loss (nats/token, smoothed)")
    axes[1].set_title("retrieval loss (smoothed)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(f"Retrieval-not-memorisation control (same recipe, first {n} steps)")
    fig.tight_layout()
    fig.savefig(RESULTS / "control_shuffled_values.png", dpi=110)
    for key in ("answer_loss", "retrieval_loss"):
        a = statistics.mean(r[key] for r in correct if 700 < r["step"] <= 900)
        b = statistics.mean(r[key] for r in shuffled if 700 < r["step"] <= 900)
        print(f"{key} steps 700-900: correct {a:.3f}, shuffled {b:.3f}")


if __name__ == "__main__":
    main()
