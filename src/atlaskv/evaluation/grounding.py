"""Knowledge-grounding evaluation (DESIGN §5 contract; method.md §6.1): AtlasKV (HiKVP-pruned) and KBLaM
(flat) KB attention here; the text-prompt baselines (rag, icl, zeroshot) in eval_text_method.

For KB size N: the KB holds every evaluated question's gold triple plus distractors from the set's pool
(seeded; `same-head` puts facts that share a head with an evaluated question first). Questions are asked
in batches against their KB; from the prefill of the same generate() call:
  acc1 / acc5   the gold entry ranks first / in the top 5 of the KB attention summed over KB layers, heads
                and prompt tokens (per-layer figures under acc1_by_layer);
  answer_em     the gold tail appears in the greedy answer (case- and punctuation-insensitive);
  answer_em_without_gold   the same questions with their gold facts removed from the KB (the prior).
"""
from __future__ import annotations

import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlaskv.model.attention import KBInputs, use_kb
from atlaskv.model.pruning import ArraySource, PruneConfig, PrunedKB
from atlaskv.kb.encoder import encode_records
from atlaskv.kb.triples import EvalQuestion, Triple, read_eval_set
from atlaskv.defaults import REFUSAL
from atlaskv.kb.records import triples_to_records
from atlaskv.model.chat import chat_text, left_pad, stop_token_ids


def normalize(text: str) -> str:
    text = text.casefold().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def contains_answer(answer: str, gold: str) -> bool:
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(answer)} "


def says_refusal(answer: str) -> bool:
    """The model's own trained refusal ("I don't know.") in a greedy answer."""
    return contains_answer(answer, REFUSAL)


@dataclass
class EvalPool:
    triples: list[Triple]
    questions: list[EvalQuestion]
    keys: np.ndarray      # [P, d_in] fp16, tail-masked records of the pool
    values: np.ndarray
    index: dict           # triple -> pool row


def load_pool(set_dir: str | Path, encoder) -> EvalPool:
    from atlaskv.model.llm import cache_dir

    triples, questions = read_eval_set(set_dir)
    keys, values = encode_records(encoder, triples_to_records(triples, "tail"), show_progress=True,
                                  cache_dir=cache_dir() / "eval")
    return EvalPool(triples, questions, keys, values, {t: i for i, t in enumerate(triples)})


def adapter_pool(pool: EvalPool, akv) -> EvalPool:
    """The pool with the values the adapter reads (token-value adapters: with the tails' token embeddings)."""
    from atlaskv.model.values import value_embeddings

    values = value_embeddings(akv.adapter, akv.model, akv.tokenizer, [t.tail for t in pool.triples], pool.values)
    return EvalPool(pool.triples, pool.questions, pool.keys, values, pool.index)


def with_synthetic_fill(pool: EvalPool, total: int, seed: int = 0) -> EvalPool:
    """The pool grown to `total` entries with synthetic distractors (real embeddings plus noise, as
    `bench scale` makes them): KB sizes past the real data, for search-quality sweeps. Questions stay real."""
    from atlaskv.evaluation.scale import _jitter

    extra = total - len(pool.triples)
    if extra <= 0:
        return pool
    rng = np.random.default_rng([seed, total])
    src = rng.integers(0, len(pool.keys), extra)
    keys, values = _jitter(pool.keys[src], 0.35, rng), _jitter(pool.values[src], 0.35, rng)
    start = len(pool.triples)
    fill = [Triple(f"synthetic entity {i}", "synthetic relation", f"synthetic value {i}") for i in range(start, total)]
    return EvalPool(pool.triples + fill, pool.questions, np.concatenate([pool.keys, keys]),
                    np.concatenate([pool.values, values]), {**pool.index, **{t: start + i for i, t in enumerate(fill)}})


def kb_chunks(pool: EvalPool, qidx: np.ndarray, size: int, distractors: str, rng: np.random.Generator):
    """[(question indices, KB pool rows)]: every KB holds its questions' golds and has `size` entries."""
    n_q = len(qidx)
    per_kb = min(n_q, size if distractors == "random" else max(1, size // 2))
    by_head: dict[str, list[int]] = {}
    if distractors == "same-head":
        for i, t in enumerate(pool.triples):
            by_head.setdefault(t.head, []).append(i)
    for s in range(0, n_q, per_kb):
        qs = qidx[s:s + per_kb]
        gold = [pool.index[pool.questions[q].triple] for q in qs]
        rows = list(dict.fromkeys(gold))
        chosen = set(rows)
        if distractors == "same-head":
            extra = [j for q in qs for j in by_head.get(pool.questions[q].head, []) if j not in chosen]
            rng.shuffle(extra)
            for j in extra:
                if len(rows) >= size:
                    break
                if j not in chosen:
                    rows.append(j)
                    chosen.add(j)
        while len(rows) < min(size, len(pool.triples)):
            for j in rng.choice(len(pool.triples), min(size, len(pool.triples)), replace=False):
                if len(rows) >= size:
                    break
                if int(j) not in chosen:
                    rows.append(int(j))
                    chosen.add(int(j))
        rows = np.array(rows, dtype=np.int64)
        rng.shuffle(rows)
        yield qs, rows


@torch.no_grad()
def ask_batch(akv, questions: list[str], kb_source, max_new_tokens: int, record: bool, scale_factor: float | None,
              qemb: torch.Tensor | None, scale_mode: str | None = None):
    """Greedy answers for a batch against one KB: `kb_source` is (keys, values) (flat) or a PrunedKB.
    scale_factor / scale_mode default to the adapter's; scale_mode "none" turns the length correction off.
    Returns (texts, the KBInputs with the prefill attention recorded, the prompt mask)."""
    tok = akv.tokenizer
    ids, mask = left_pad(tok, [chat_text(tok, q) for q in questions], akv.device)
    cfg = akv.adapter.config
    mode = scale_mode or cfg.kb_scale_mode
    scale = None if mode == "none" else (scale_factor if scale_factor is not None else cfg.kb_scale_factor)
    src = dict(pruned=kb_source) if isinstance(kb_source, PrunedKB) else dict(keys=kb_source[0], values=kb_source[1])
    kb = KBInputs(**src, record=record, question_emb=qemb, scale_factor=scale, token_mask=mask,
                  scale_mode="shift" if mode == "none" else mode)
    stop = stop_token_ids(tok, akv.model)  # EOS and the chat format's end of turn (<|im_end|>, <end_of_turn>)
    with use_kb(kb):
        out = akv.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=stop)
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts, kb, mask


def rank_hits(ranked: list[list[int]], gold: list[int]) -> tuple[int, int]:
    """(#gold ranked first, #gold in the top 5) over samples; `ranked` is best first."""
    hits1 = sum(bool(r) and r[0] == g for r, g in zip(ranked, gold))
    return hits1, sum(g in r[:5] for r, g in zip(ranked, gold))


def grounding_hits(kb: KBInputs, mask: torch.Tensor, gold: torch.Tensor) -> dict:
    """Per batch: hits@1 / @5 of the summed KB attention, per-layer hits@1, and (pruned) how many
    (question, layer) pairs kept the gold entry among the final leaves."""
    ranked = kb.summed_attention(mask)
    hits1, hits5 = rank_hits([pos.tolist() for pos, _ in ranked], gold.tolist())
    out = {"hits1": hits1, "hits5": hits5, "layer_hits": [], "kept": 0}
    for l, att in kb.attention.items():
        w = (att * mask[:, :, None].to(att.dtype)).sum(1)                              # [B, K]
        if kb.pruned is None:
            out["layer_hits"].append(int((w.argmax(-1) == gold).sum()))
            continue
        pos = kb.selected[l]
        w = w.masked_fill(pos < 0, -1)
        out["layer_hits"].append(int((pos.gather(1, w.argmax(-1, keepdim=True))[:, 0] == gold).sum()))
        out["kept"] += int((pos == gold[:, None]).any(-1).sum())
    return out


def eval_grounding(set_dir: str | Path, sizes: list[int], akv, encoder, n_questions: int = 500,
                   distractors: str = "random", seed: int = 0, batch_size: int = 16, answers: bool = True,
                   answer_questions: int | None = None, max_new_tokens: int = 32,
                   scale_factor: float | None = None, scale_mode: str | None = None,
                   prune: PruneConfig | None = None, progress: bool = True, synthetic_fill: bool = False,
                   refuse_below: float | None = None) -> dict:
    """`prune`: HiKVP over a tree built for each KB (its build time is reported as index_seconds).
    `synthetic_fill`: sizes past the set's pool are reached with synthetic distractors (reported per row).
    `refuse_below`: also score the answers as `ask` / `serve` give them, with the refusal rule on: an answer
    whose top-cited fact's weight is under this multiple of the second's (Answer.support) becomes
    "I don't know." and counts as wrong (extra fields `*_with_refusal`, `refused*`)."""
    from tqdm.auto import tqdm

    from atlaskv.kb.index import build_hierarchy
    from atlaskv.model.atlaskv import support_of

    pool = real = adapter_pool(load_pool(set_dir, encoder), akv)
    if synthetic_fill and max(sizes) > len(pool.triples):
        pool = with_synthetic_fill(pool, max(sizes), seed)
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(pool.questions))[: min(n_questions, len(pool.questions))]
    n_ans = len(qidx) if answer_questions is None else min(answer_questions, len(qidx))
    results = []
    needs_q = akv.adapter.config.question_input or (prune is not None and prune.route != "kbq")
    kb_layers = akv.adapter.config.kb_layers
    for size in sizes:
        size = min(size, len(pool.triples))
        t0 = time.time()
        hits1 = hits5 = n = em = em_prior = n_em = kept = 0
        em_r = em_prior_r = refused = refused_prior = 0  # with the refusal rule (refuse_below)
        idk = idk_prior = 0  # the model's own "I don't know."
        index_s = 0.0
        layer_hits = np.zeros(len(kb_layers))
        chunks = list(kb_chunks(pool, qidx, size, distractors, np.random.default_rng([seed, size])))
        bar = tqdm(total=len(qidx), desc=f"{Path(set_dir).name} N={size}{' pruned' if prune else ''}",
                   disable=not progress)
        asked = 0
        for qs, rows in chunks:
            keys_np, values_np = pool.keys[rows].astype(np.float32), pool.values[rows].astype(np.float32)
            if prune is not None:
                ti = time.time()
                tree = build_hierarchy(keys_np, seed=seed)
                index_s += time.time() - ti
                source = PrunedKB(tree, ArraySource(keys_np), ArraySource(values_np), config=prune, device=akv.device)
            else:
                source = (torch.from_numpy(keys_np).to(akv.device), torch.from_numpy(values_np).to(akv.device))
            pos = {int(r): p for p, r in enumerate(rows)}
            for s in range(0, len(qs), batch_size):
                bq = [pool.questions[q] for q in qs[s:s + batch_size]]
                qtexts = [q.question for q in bq]
                qemb = torch.from_numpy(encoder.encode(qtexts)).to(akv.device) if needs_q else None
                want_answers = answers and asked < n_ans
                texts, kb, mask = ask_batch(akv, qtexts, source, max_new_tokens if want_answers else 1,
                                            True, scale_factor, qemb, scale_mode)
                gold = torch.tensor([pos[pool.index[q.triple]] for q in bq], device=akv.device)
                h = grounding_hits(kb, mask, gold)
                hits1, hits5, kept = hits1 + h["hits1"], hits5 + h["hits5"], kept + h["kept"]
                layer_hits += np.array(h["layer_hits"])
                n += len(bq)
                if want_answers:
                    take = min(len(bq), n_ans - asked)
                    right = [contains_answer(t, q.tail) for t, q in zip(texts[:take], bq[:take])]
                    em += sum(right)
                    idk += sum(map(says_refusal, texts[:take]))
                    if refuse_below is not None:
                        kept_ = [support_of(w) >= refuse_below for _, w in kb.summed_attention(mask)[:take]]
                        em_r += sum(r and k for r, k in zip(right, kept_))
                        refused += take - sum(kept_)
                    keep = np.ones(len(rows), dtype=bool)
                    keep[gold.cpu().numpy()] = False  # the batch's own facts removed: what the model knows without them
                    sub_q = qemb[:take] if qemb is not None else None
                    rec = refuse_below is not None
                    kb_p = None
                    if not keep.any():
                        pt = [akv.generate(q, None, max_new_tokens=max_new_tokens) for q in qtexts[:take]]
                    elif prune is not None:  # the same tree with the gold leaves tombstoned
                        without = PrunedKB(tree, source.keys, source.values, live=keep, config=prune, device=akv.device)
                        pt, kb_p, mask_p = ask_batch(akv, qtexts[:take], without, max_new_tokens, rec, scale_factor,
                                                     sub_q, scale_mode)
                    else:
                        k = torch.from_numpy(keep).to(akv.device)
                        pt, kb_p, mask_p = ask_batch(akv, qtexts[:take], (source[0][k], source[1][k]), max_new_tokens,
                                                     rec, scale_factor, sub_q, scale_mode)
                    right = [contains_answer(t, q.tail) for t, q in zip(pt, bq[:take])]
                    em_prior += sum(right)
                    idk_prior += sum(map(says_refusal, pt))
                    if rec:  # an empty KB backs nothing: refused
                        kept_ = [False] * take if kb_p is None else \
                            [support_of(w) >= refuse_below for _, w in kb_p.summed_attention(mask_p)]
                        em_prior_r += sum(r and k for r, k in zip(right, kept_))
                        refused_prior += take - sum(kept_)
                    n_em += take
                    asked += take
                bar.update(len(bq))
        bar.close()
        results.append({
            "kb_size": size, "pruned": prune is not None, "n_questions": n, "acc1": hits1 / n, "acc5": hits5 / n,
            "pruning_recall": kept / (n * len(kb_layers)) if prune is not None else None,
            "answer_em": em / n_em if n_em else None,
            "answer_em_without_gold": em_prior / n_em if n_em else None,
            "n_answer_questions": n_em,
            "own_refusals_with_gold": idk / n_em if n_em else None,
            "own_refusals_without_gold": idk_prior / n_em if n_em else None,
            **({"answer_em_with_refusal": em_r / n_em, "answer_em_without_gold_with_refusal": em_prior_r / n_em,
                "refused_with_gold": refused / n_em, "refused_without_gold": refused_prior / n_em}
               if refuse_below is not None and n_em else {}),
            "acc1_by_layer": {str(l): float(h) / n for l, h in zip(kb_layers, layer_hits)},
            "seconds": round(time.time() - t0, 1),
            **({"index_seconds": round(index_s, 2)} if prune is not None else {}),
            **({"synthetic_entries": size - len(real.triples)} if size > len(real.triples) else {}),
        })
    cfg = akv.adapter.config
    mode = scale_mode or cfg.kb_scale_mode
    out = {"set": Path(set_dir).name, "method": "atlaskv", "distractors": distractors, "seed": seed,
           "scale_factor": None if mode == "none" else (scale_factor if scale_factor is not None
                                                        else cfg.kb_scale_factor),
           "scale_mode": mode, "results": results}
    if refuse_below is not None:
        out["refuse_below"] = refuse_below
    if prune is not None:
        out["prune"] = {"top_k": list(prune.top_k), "route": prune.route, "per_head": prune.per_head,
                        "reuse": prune.reuse, "scale_n": prune.scale_n}
    return out


def eval_text_method(set_dir: str | Path, sizes: list[int], akv, encoder, method: str, n_questions: int = 500,
                     distractors: str = "random", seed: int = 0, batch_size: int = 16,
                     answer_questions: int | None = None, max_new_tokens: int = 32, top_k: int = 5,
                     judge=None, progress: bool = True) -> dict:
    """The text-prompt baselines (baselines.py) on the same KBs and questions as eval_grounding.
    rag: acc1/acc5 are the retriever's hit@1/@5; icl: a size whose prompt exceeds the context window is
    reported `too_long`; zeroshot: answers only (the KB plays no part, so every size reads the same)."""
    from tqdm.auto import tqdm

    from atlaskv.evaluation.baselines import (TEXT_METHODS, DenseRetriever, answer_with_shared_facts, context_window, fact_sentences,
                            facts_prompt, prompt_tokens)

    if method not in TEXT_METHODS:
        raise ValueError(f"method must be one of {TEXT_METHODS}, got {method!r}")
    pool = load_pool(set_dir, encoder)
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(pool.questions))[: min(n_questions, len(pool.questions))]
    n_ans = len(qidx) if answer_questions is None else min(answer_questions, len(qidx))
    sentences = fact_sentences(pool.triples)
    window = context_window(akv)
    results, zeroshot_row = [], None
    for size in sizes:
        size = min(size, len(pool.triples))
        t0 = time.time()
        if method == "zeroshot" and zeroshot_row is not None:
            results.append({**zeroshot_row, "kb_size": size})
            continue
        hits1 = hits5 = n = em = em_prior = n_em = judged = 0
        judge_sum = 0.0
        longest = 0
        status = "ok"
        bar = tqdm(total=len(qidx), desc=f"{Path(set_dir).name} N={size} {method}", disable=not progress)
        for qs, rows in kb_chunks(pool, qidx, size, distractors, np.random.default_rng([seed, size])):
            pos = {int(r): p for p, r in enumerate(rows)}
            retriever = DenseRetriever(pool.keys[rows]) if method == "rag" else None
            facts = [sentences[r] for r in rows]
            if method == "icl":
                longest = max(longest, max(prompt_tokens(akv, facts_prompt(pool.questions[q].question, facts))
                                           for q in qs[:4]))
                if longest + max_new_tokens > window:
                    status = "too_long"
                    break
            for s in range(0, len(qs), batch_size):
                bq = [pool.questions[q] for q in qs[s:s + batch_size]]
                qtexts = [q.question for q in bq]
                gold = [pos[pool.index[q.triple]] for q in bq]
                ranked = None
                if method == "rag":
                    ranked = retriever.search(encoder.encode(qtexts), max(5, top_k + 1))
                    h1, h5 = rank_hits([r.tolist() for r in ranked], gold)
                    hits1, hits5 = hits1 + h1, hits5 + h5
                n += len(bq)
                take = min(len(bq), n_ans - n_em)
                if take > 0:
                    prompts, prior_prompts = [], []
                    for i in range(take):
                        if method == "rag":
                            with_gold = [facts[j] for j in ranked[i][:top_k]]
                            without = [facts[j] for j in ranked[i] if j != gold[i]][:top_k]
                        elif method == "icl":
                            break
                        else:
                            with_gold = without = []
                        prompts.append(facts_prompt(qtexts[i], with_gold))
                        prior_prompts.append(facts_prompt(qtexts[i], without))
                    if method == "icl":  # one fact list per batch: its prefix is computed once
                        without = [f for j, f in enumerate(facts) if j not in set(gold[:take])]
                        texts = answer_with_shared_facts(akv, qtexts[:take], facts, max_new_tokens)
                        prior = answer_with_shared_facts(akv, qtexts[:take], without, max_new_tokens)
                    else:
                        texts = _answer(akv, prompts, max_new_tokens)
                        prior = _answer(akv, prior_prompts, max_new_tokens) if method == "rag" else None
                    em += sum(contains_answer(t, q.tail) for t, q in zip(texts, bq))
                    if prior is not None:
                        em_prior += sum(contains_answer(t, q.tail) for t, q in zip(prior, bq))
                    if judge is not None:
                        for t, q in zip(texts, bq):
                            judge_sum += judge(q.question, q.tail, t)
                            judged += 1
                    n_em += take
                bar.update(len(bq))
        bar.close()
        row = {"kb_size": size, "status": status, "n_questions": n,
               "acc1": hits1 / n if method == "rag" and n else None,
               "acc5": hits5 / n if method == "rag" and n else None, "pruning_recall": None,
               "answer_em": em / n_em if n_em and status == "ok" else None,
               "answer_em_without_gold": em_prior / n_em if n_em and method != "zeroshot" and status == "ok" else None,
               "n_answer_questions": n_em if status == "ok" else 0, "seconds": round(time.time() - t0, 1)}
        if method == "icl":
            row.update(prompt_tokens=longest, context_window=window)
        if judge is not None and judged:
            row["judge_score"] = judge_sum / judged
        if method == "zeroshot":
            zeroshot_row = row
        results.append(row)
    return {"set": Path(set_dir).name, "method": method, "distractors": distractors, "seed": seed,
            **({"top_k": top_k} if method == "rag" else {}), "results": results}


def _answer(akv, prompts: list[str], max_new_tokens: int) -> list[str]:
    from atlaskv.evaluation.baselines import answer_with_prompts

    return answer_with_prompts(akv, prompts, max_new_tokens)


def openai_judge(base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
    """The paper's GPT-4o relevance score, from any OpenAI-compatible chat endpoint: 0-5 per answer,
    returned scaled to 0-1. Only called when the user passes --judge (nothing here reaches one)."""
    import json
    import re
    import urllib.request

    url = base_url.rstrip("/") + "/chat/completions"

    def score(question: str, gold: str, answer: str) -> float:
        prompt = (f"Question: {question}\nReference answer: {gold}\nModel answer: {answer}\n"
                  "On a scale of 0 to 5, how well does the model answer agree with the reference answer? "
                  "Reply with the number only.")
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": 4, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
            text = json.loads(r.read())["choices"][0]["message"]["content"]
        m = re.search(r"[0-5](?:\.\d+)?", text)
        return float(m.group()) / 5 if m else 0.0

    return score
