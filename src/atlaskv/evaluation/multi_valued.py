"""Multi-valued keys (issue 22 item 3): questions whose key (head, relation) has several values in the KB, e.g.
"What are the genres of X?". Every triple of the set with the question's head and relation is a gold value;
the KB holds all of them plus distractors (the set's other keys, then `fill` triples from another set).

Per KB size, from the answers as `ask` decodes them:
  value_recall      gold values the answer names (as whole names) / gold values
  value_precision   named values that are gold / KB values the answer names (values the question holds
                    do not count)
  all_named         answers naming every gold value and nothing else
  cited_recall      gold values among the top-5 citations (the grounding half of recall)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from atlaskv.evaluation.grounding import ask_batch
from atlaskv.evaluation.metrics import names_exactly, normalize
from atlaskv.evaluation.pool import load_pool
from atlaskv.kb.index import build_hierarchy
from atlaskv.kb.view import KBView
from atlaskv.model.pruning import PruneConfig


def named_values(answer: str, values: list[str], question: str) -> set[str]:
    """The values an answer names as whole names, leaving out those the question itself holds."""
    asked = f" {normalize(question)} "
    return {v for v in values if f" {normalize(v)} " not in asked and names_exactly(answer, v)}


def eval_multi_valued(set_dir: str | Path, sizes: list[int], akv, encoder, fill: str | Path | None = None,
                      n_questions: int = 200, seed: int = 0, batch_size: int = 16, max_new_tokens: int = 48,
                      prune: PruneConfig | None = None, value_decoding: bool = True,
                      save_answers: str | Path | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    pool = load_pool(set_dir, encoder)
    keys, values, triples = pool.keys, pool.values, list(pool.triples)
    if fill is not None:
        extra = load_pool(fill, encoder)
        keys, values = np.concatenate([keys, extra.keys]), np.concatenate([values, extra.values])
        triples += extra.triples
    gold_rows: dict[tuple, list[int]] = {}
    for i, t in enumerate(pool.triples):
        gold_rows.setdefault((t.head, t.relation), []).append(i)
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(pool.questions))[:n_questions]
    saved, results = [], []
    for size in sizes:
        size = min(size, len(triples))
        t0 = time.time()
        tally = dict(gold=0, gold_named=0, named=0, named_gold=0, all_named=0, cited=0, n=0)
        chunk = max(1, min(len(qidx), size // 4))  # 2-5 golds per question: a quarter of the KB at most
        bar = tqdm(total=len(qidx), desc=f"{Path(set_dir).name} N={size}", disable=not progress)
        for s in range(0, len(qidx), chunk):
            qs = [pool.questions[q] for q in qidx[s:s + chunk]]
            gold = list(dict.fromkeys(r for q in qs for r in gold_rows[(q.head, q.relation)]))
            taken = set(gold)
            others = [int(r) for r in rng.permutation(len(triples)) if int(r) not in taken][:max(0, size - len(gold))]
            rows = np.array(gold + others, np.int64)
            rng.shuffle(rows)
            k = keys[rows].astype(np.float32)
            view = KBView.from_arrays(k, values[rows].astype(np.float32), [triples[r] for r in rows],
                                      build_hierarchy(k, seed=seed) if prune is not None else None)
            kb_values = list(dict.fromkeys(triples[r].tail for r in rows))
            for b in range(0, len(qs), batch_size):
                bq = qs[b:b + batch_size]
                texts = [q.question for q in bq]
                qemb = torch.from_numpy(encoder.encode(texts)).to(akv.device)
                asked = ask_batch(akv, texts, view, max_new_tokens, True, prune, qemb, value_decoding=value_decoding)
                cited = asked.kb.cited_rows(asked.mask)
                for q, text, (crow, _) in zip(bq, asked.texts, cited):
                    golds = {triples[r].tail for r in gold_rows[(q.head, q.relation)]}
                    named = named_values(text, kb_values, q.question)
                    top = {view.triples(np.array([c]))[0].tail for c in crow[:5]}
                    tally["gold"] += len(golds)
                    tally["gold_named"] += len(golds & named)
                    tally["named"] += len(named)
                    tally["named_gold"] += len(named & golds)
                    tally["all_named"] += named == golds
                    tally["cited"] += len(golds & top)
                    tally["n"] += 1
                    if save_answers:
                        saved.append({"kb_size": size, "question": q.question, "gold": sorted(golds),
                                      "answer": text.strip(), "named": sorted(named), "top5_cited": sorted(top)})
                bar.update(len(bq))
        bar.close()
        results.append({"kb_size": size, "pruned": prune is not None, "n_questions": tally["n"],
                        "value_recall": tally["gold_named"] / tally["gold"],
                        "value_precision": tally["named_gold"] / tally["named"] if tally["named"] else None,
                        "all_named": tally["all_named"] / tally["n"],
                        "cited_recall": tally["cited"] / tally["gold"], "seconds": round(time.time() - t0, 1)})
    if save_answers:
        Path(save_answers).parent.mkdir(parents=True, exist_ok=True)
        Path(save_answers).write_text("".join(json.dumps(r) + "\n" for r in saved), encoding="utf-8")
    return {"set": Path(set_dir).name, "fill": Path(fill).name if fill else None, "value_decoding": value_decoding,
            "results": results}
