"""The paper's Figure 6 from benchmarks/results/topk_sweep/*.json (bash benchmarks/run_topk_sweep.sh):
ACC@1, ACC@5 and pruning recall vs the k kept at one level, the other two at the defaults.
    .venv/bin/python benchmarks/plot_topk_sweep.py   ->  benchmarks/results/topk_sweep.png (+ a table)
"""
import json
from pathlib import Path

R = Path(__file__).parent / "results"
LEVELS = (("roots", "k_R (roots kept)"), ("inters", "k_I (inter clusters kept)"), ("leaves", "k_L (leaves kept)"))
DEFAULT = {"roots": 128, "inters": 64, "leaves": 64}


def row(f: Path) -> dict:
    return json.loads(f.read_text())["results"][0]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = R / "topk_sweep"
    default = d / "leaves_64.json"
    flat = row(d / "flat.json") if (d / "flat.json").is_file() else None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    print("| level | k | ACC@1 | ACC@5 | pruning recall |\n|---|---|---|---|---|")
    for ax, (level, label) in zip(axes, LEVELS):
        files = sorted(d.glob(f"{level}_*.json"), key=lambda f: int(f.stem.split("_")[1]))
        pts = [(int(f.stem.split("_")[1]), row(f)) for f in files]
        if default.is_file() and level != "leaves":
            pts = sorted(pts + [(DEFAULT[level], row(default))])
        if not pts:
            continue
        ks = [k for k, _ in pts]
        for key, style in (("acc1", "o-"), ("acc5", "s--"), ("pruning_recall", "^:")):
            ax.plot(ks, [r[key] for _, r in pts], style, label=key)
        if flat:
            ax.axhline(flat["acc1"], color="gray", lw=1, label="flat acc1")
        for k, r in pts:
            print(f"| {level} | {k} | {r['acc1']:.3f} | {r['acc5']:.3f} | {r['pruning_recall']:.3f} |")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("fraction of questions")
    axes[0].legend(fontsize=8)
    n = row(default)["n_questions"] if default.is_file() else "?"
    fig.suptitle(f"HiKVP top-k per level, 10^5 entries (fb15k-para same-head + synthetic), {n} questions; "
                 "others at 128 / 64 / 64")
    fig.tight_layout()
    fig.savefig(R / "topk_sweep.png", dpi=110)
    if flat:
        print(f"flat: ACC@1 {flat['acc1']:.3f} ACC@5 {flat['acc5']:.3f}")


if __name__ == "__main__":
    main()
