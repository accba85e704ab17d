"""Markdown tables of the HiKVP results (pruned vs flat grounding, scale) from benchmarks/results/*.json."""
import json
from pathlib import Path

R = Path(__file__).parent / "results"


def rows(name):
    p = R / name
    return json.loads(p.read_text())["results"] if p.exists() else []


def fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


print("| set | KB size | flat ACC@1 | pruned ACC@1 | pruned / flat | flat ACC@5 | pruned ACC@5 | pruning recall | pruned answer EM (without gold) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for label, flat_files, pruned in [
    ("fb15k", ["grounding_fb15k_flat.json"], "grounding_fb15k_pruned.json"),
    ("pararel", ["grounding_pararel_flat.json"], "grounding_pararel_pruned.json"),
    ("fb15k-para same-head", ["grounding_fb15k-para_samehead_flat.json", "grounding_fb15k-para_samehead_flat_40844.json"],
     "grounding_fb15k-para_samehead_pruned.json")]:
    flat = {r["kb_size"]: r for f in flat_files for r in rows(f)}
    for r in rows(pruned):
        f = flat.get(r["kb_size"], {})
        ratio = r["acc1"] / f["acc1"] if f.get("acc1") else None
        em = f"{fmt(r['answer_em'], 2)} ({fmt(r['answer_em_without_gold'], 2)})" if r["answer_em"] is not None else "–"
        print(f"| {label} | {r['kb_size']:,} | {fmt(f.get('acc1'))} | {fmt(r['acc1'])} | {fmt(ratio, 2)} | "
              f"{fmt(f.get('acc5'))} | {fmt(r['acc5'])} | {fmt(r['pruning_recall'])} | {em} |")

scale = R / "scale.json"
if scale.exists():
    res = json.loads(scale.read_text())["results"]
    zs = {r["kb_size"]: r for r in res if r["method"] == "zeroshot"}
    print("\n| method | KB size | status | peak RSS (MB) | vs no KB | prefill (s) | decode (s/token) | vs no KB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in res:
        z = zs.get(r["kb_size"], {})
        rss, dec = r.get("peak_rss_mb"), r.get("decode_s_per_token")
        drss = f"{rss - z['peak_rss_mb']:+.0f}" if rss and z.get("peak_rss_mb") else "–"
        ddec = f"{dec / z['decode_s_per_token']:.2f}x" if dec and z.get("decode_s_per_token") else "–"
        print(f"| {r['method']} | {r['kb_size']:,}{' (synthetic)' if r.get('synthetic') else ''} | {r['status']} | "
              f"{rss if rss else '–'} | {drss} | {r.get('prefill_s', '–')} | {dec if dec else '–'} | {ddec} |")
