"""Does the backing fact answer the question? The frozen LLM itself as the judge, measured on saved answers (a
refusal-signal candidate for relation names the adapter never trained on, 2026-12-08; not shipped).

Per saved answer whose head the question names (the ones the refusal rule must judge by relation), one short prompt
to the base model, without the KB: "Fact: The birth place of X is Y. Question: Where was X born? Does the fact
answer the question? Reply yes or no." The signal is log p(yes) - log p(no) at the answer's first token. Printed:
AUROC of the signal between answerable (gold fact backing) and unanswerable (another fact backing) answers, per
file, over all of them and over those the shipped rule lets through. Runs SmolLM2 (one prefill per answer), not the adapter.

    .venv/bin/python benchmarks/fact_judge.py benchmarks/results/alias_finetune/v4/dev_fb15k-train-aliases.jsonl \
        runs/own_refusal_s1.59/webnlg.jsonl --json benchmarks/results/alias_finetune/v4/fact_judge.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from refusal_rules import lacking, load, shipped_v5

from atlaskv.defaults import LACKING_RATIO

from atlaskv.kb.records import ENTITY, RelationNouns, answer_for
from atlaskv.model.chat import chat_text
from atlaskv.model.llm import load_base_model

PROMPT = "Fact: {fact}\nQuestion: {question}\nDoes the fact answer the question? Reply yes or no."


def auroc(a: np.ndarray, u: np.ndarray) -> float:
    return float(((a[:, None] > u[None]).sum() + 0.5 * (a[:, None] == u[None]).sum()) / (len(a) * len(u)))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("answers", nargs="+")
    ap.add_argument("--json")
    args = ap.parse_args()
    model, tok = load_base_model()
    nouns = RelationNouns()
    ids = {w: [tok.encode(v, add_special_tokens=False)[0] for v in (w, w.capitalize(), " " + w)] for w in ("yes", "no")}
    out = {}
    for path in args.answers:
        rows = [r for r in load([path]) if r.get("head_named") and r.get("backing") is not None]
        scores = []
        for r in rows:
            h, rel, t = r["cited"][r["backing"]]
            fact = answer_for(nouns.template(rel, "tail").replace(ENTITY, h), t)
            prompt = chat_text(tok, PROMPT.format(fact=fact, question=r["question"]))
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1].float().log_softmax(-1)
            scores.append(float(torch.logsumexp(logits[ids["yes"]], 0) - torch.logsumexp(logits[ids["no"]], 0)))
        s = np.array(scores)
        ans = np.array([r["answerable"] for r in rows])
        through = np.array([not (shipped_v5(r) or lacking(r) >= LACKING_RATIO) for r in rows])
        res = {"n_answerable": int(ans.sum()), "n_unanswerable": int((~ans).sum()),
               "auroc": round(auroc(s[ans], s[~ans]), 3) if ans.any() and (~ans).any() else None,
               "mean_answerable": round(float(s[ans].mean()), 3), "mean_unanswerable": round(float(s[~ans].mean()), 3),
               # among the answers the shipped rule lets through: what a new check would have to sort
               "let_through": [int((ans & through).sum()), int((~ans & through).sum())],
               "auroc_let_through": round(auroc(s[ans & through], s[~ans & through]), 3)
               if (ans & through).any() and (~ans & through).any() else None}
        out[path] = res
        print(path, res)
    if args.json:
        Path(args.json).write_text(json.dumps({"prompt": PROMPT, "results": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
