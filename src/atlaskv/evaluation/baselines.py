"""Text-prompt baselines (DESIGN §5): the same frozen LLM, the facts written into the prompt instead of
attended as knowledge tokens. What a user would otherwise run, measured on the same KBs and questions.

    zeroshot  the question alone: what the model knows by itself
    icl       every KB fact in the prompt, while it fits the context window
    rag       the sentence encoder retrieves the top-k facts (faiss inner product over the same key
              embeddings the KB stores), which go into the prompt

Facts are written as the KB's own answer sentences ("The place of birth of Barack Obama is Honolulu."),
so every method reads the same words.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atlaskv.kb.triples import Triple
from atlaskv.kb.records import triples_to_records
from atlaskv.defaults import EVAL_MAX_NEW_TOKENS
from atlaskv.evaluation.metrics import answer_flags, contains_answer, rank_hits
from atlaskv.evaluation.pool import kb_chunks, load_pool
from atlaskv.model.chat import chat_text, ended_turns, left_pad, stop_token_ids

TEXT_METHODS = ("zeroshot", "icl", "rag")
RAG_TOP_K = 5


def fact_sentences(triples: Sequence[Triple]) -> list[str]:
    return [r.answer for r in triples_to_records(triples, "tail")]


def facts_prompt(question: str, facts: Sequence[str]) -> str:
    if not facts:
        return question
    lines = "\n".join(f"- {f}" for f in facts)
    return f"Facts:\n{lines}\n\nAnswer the question with the facts above.\nQuestion: {question}"


class DenseRetriever:
    """Exact inner-product search over L2-normalised key embeddings (cosine), faiss on the CPU.
    Keys are the tail-masked key texts ("the place of birth of Barack Obama"), as in the KB."""

    def __init__(self, keys: np.ndarray, chunk: int = 1 << 18):
        import faiss

        self.index = faiss.IndexFlatIP(keys.shape[1])
        for s in range(0, len(keys), chunk):  # keys may be a memory map: never all of it as fp32 at once
            x = np.ascontiguousarray(keys[s:s + chunk], np.float32)
            faiss.normalize_L2(x)
            self.index.add(x)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """[B, min(k, n)] row indices, best first."""
        import faiss

        q = np.ascontiguousarray(queries, np.float32).copy()
        faiss.normalize_L2(q)
        return self.index.search(q, min(k, len(self)))[1]


def context_window(akv) -> int:
    return int(getattr(akv.model.config, "max_position_embeddings", 2048))


def prompt_tokens(akv, text: str) -> int:
    return len(akv.tokenizer(chat_text(akv.tokenizer, text), add_special_tokens=False)["input_ids"])


class Answers(list):
    """Answer texts, with .ended[i]: the i-th answer closed its turn within the token budget."""

    def __init__(self, texts, ended):
        super().__init__(texts)
        self.ended = list(ended)


@torch.no_grad()
def answer_with_prompts(akv, prompts: list[str], max_new_tokens: int) -> Answers:
    """Greedy answers, no KB attention: the stock model on the written prompts (batched, left-padded)."""
    tok = akv.tokenizer
    ids, mask = left_pad(tok, [chat_text(tok, p) for p in prompts], akv.device)
    stop = stop_token_ids(tok, akv.model)
    out = akv.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=stop)
    new = out[:, ids.shape[1]:]
    return Answers(tok.batch_decode(new, skip_special_tokens=True),
                   ended_turns(new, stop))


@torch.no_grad()
def answer_with_shared_facts(akv, questions: list[str], facts: Sequence[str], max_new_tokens: int) -> Answers:
    """ICL answers for many questions over one fact list: the facts' prefix is run once and its KV cache
    reused for every question (prompt caching, as serving stacks do), the stronger and fairer baseline:
    without it 100 facts cost 9 s per question here."""
    import copy

    tok = akv.tokenizer
    marker = "\x00QUESTION\x00"
    template = chat_text(tok, facts_prompt(marker, facts))
    head, tail = template.split(marker)
    prefix = tok(head, add_special_tokens=False, return_tensors="pt")["input_ids"].to(akv.device)
    cache = akv.model(prefix, use_cache=True).past_key_values
    stop = stop_token_ids(tok, akv.model)
    texts, ended = [], []
    for q in questions:
        rest = tok(q + tail, add_special_tokens=False, return_tensors="pt")["input_ids"].to(akv.device)
        ids = torch.cat([prefix, rest], 1)
        out = akv.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=copy.deepcopy(cache),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=stop)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        ended += ended_turns(out[:, ids.shape[1]:], stop)
    return Answers(texts, ended)


def eval_text_method(set_dir: str | Path, sizes: list[int], akv, encoder, method: str, n_questions: int = 500,
                     distractors: str = "random", seed: int = 0, batch_size: int = 16,
                     answer_questions: int | None = None, max_new_tokens: int = EVAL_MAX_NEW_TOKENS, top_k: int = RAG_TOP_K,
                     judge=None, progress: bool = True) -> dict:
    """The text-prompt baselines (baselines.py) on the same KBs and questions as eval_grounding.
    rag: acc1/acc5 are the retriever's hit@1/@5; icl: a size whose prompt exceeds the context window is
    reported `too_long`; zeroshot: answers only (the KB plays no part, so every size reads the same)."""
    from tqdm.auto import tqdm

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
        hits1 = hits5 = n = n_em = 0
        c = Counter()  # answer counts of this size (_score)
        longest = 0
        status = "ok"
        bar = tqdm(total=len(qidx), desc=f"{Path(set_dir).name} N={size} {method}", disable=not progress)
        for qs, rows in kb_chunks(pool, qidx, size, distractors, np.random.default_rng([seed, size])):
            pos = {int(r): p for p, r in enumerate(rows)}
            retriever = DenseRetriever(pool.keys[rows]) if method == "rag" else None
            facts = [sentences[r] for r in rows]
            kb_values = sorted({pool.triples[r].tail for r in rows})
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
                    texts, prior = _text_answers(akv, method, qtexts[:take], facts, ranked, gold, top_k, max_new_tokens)
                    c.update(_score(texts, prior, bq, kb_values, judge))
                    n_em += take
                bar.update(len(bq))
        bar.close()
        ok = status == "ok"
        row = {"kb_size": size, "status": status, "n_questions": n,
               "acc1": hits1 / n if method == "rag" and n else None,
               "acc5": hits5 / n if method == "rag" and n else None, "pruning_recall": None,
               "answer_em": c["em"] / n_em if n_em and ok else None,
               "answer_em_without_gold": c["em_prior"] / n_em if n_em and method != "zeroshot" and ok else None,
               "answer_exact": c["exact"] / n_em if n_em and ok else None,
               "answer_loops": c["loops"] / n_em if n_em and ok else None,
               "n_answer_questions": n_em if ok else 0, "seconds": round(time.time() - t0, 1)}
        if method == "icl":
            row.update(prompt_tokens=longest, context_window=window)
        if judge is not None and c["judged"]:
            row["judge_score"] = c["judge_sum"] / c["judged"]
        if method == "zeroshot":
            zeroshot_row = row
        results.append(row)
    return {"set": Path(set_dir).name, "method": method, "distractors": distractors, "seed": seed,
            **({"top_k": top_k} if method == "rag" else {}), "results": results}




def _score(texts: Answers, prior: Answers | None, bq: list, kb_values: list[str], judge) -> Counter:
    """Answer counts of one batch: em (and without gold), answer_exact and loops (metrics.answer_flags),
    the judge's scores."""
    c = Counter(em=sum(contains_answer(t, q.tail) for t, q in zip(texts, bq)))
    flags = [answer_flags(t, q.tail, kb_values, e, q.question) for t, q, e in zip(texts, bq, texts.ended)]
    c.update(exact=sum(f["exact"] for f in flags), loops=sum(f["loop"] for f in flags))
    if prior is not None:
        c["em_prior"] += sum(contains_answer(t, q.tail) for t, q in zip(prior, bq))
    if judge is not None:
        for t, q in zip(texts, bq):
            c["judge_sum"] += judge(q.question, q.tail, t)
            c["judged"] += 1
    return c


def _text_answers(akv, method: str, qtexts: list[str], facts: list[str], ranked, gold: list[int], top_k: int,
                  max_new_tokens: int) -> tuple[list[str], list[str] | None]:
    """(answers, answers without the gold facts; None for zeroshot) of one batch of a text method."""
    take = len(qtexts)
    if method == "icl":  # one fact list per batch: its prefix is computed once
        without = [f for j, f in enumerate(facts) if j not in set(gold[:take])]
        return (answer_with_shared_facts(akv, qtexts, facts, max_new_tokens),
                answer_with_shared_facts(akv, qtexts, without, max_new_tokens))
    prompts, prior_prompts = [], []
    for i in range(take):
        if method == "rag":
            with_gold = [facts[j] for j in ranked[i][:top_k]]
            without = [facts[j] for j in ranked[i] if j != gold[i]][:top_k]
        else:
            with_gold = without = []
        prompts.append(facts_prompt(qtexts[i], with_gold))
        prior_prompts.append(facts_prompt(qtexts[i], without))
    texts = answer_with_prompts(akv, prompts, max_new_tokens)
    return texts, answer_with_prompts(akv, prior_prompts, max_new_tokens) if method == "rag" else None


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
