"""Knowledge-grounding evaluation (DESIGN §5 contract; method.md §6.1), flat KB attention.

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

from .attention import KBInputs, use_kb
from .encoder import encode_records
from .kg import EvalQuestion, Triple, read_eval_set
from .kg2kv import triples_to_records


def normalize(text: str) -> str:
    text = text.casefold().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(text.split())


def contains_answer(answer: str, gold: str) -> bool:
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(answer)} "


@dataclass
class EvalPool:
    triples: list[Triple]
    questions: list[EvalQuestion]
    keys: np.ndarray      # [P, d_in] fp16, tail-masked records of the pool
    values: np.ndarray
    index: dict           # triple -> pool row


def load_pool(set_dir: str | Path, encoder) -> EvalPool:
    from .llm import cache_dir

    triples, questions = read_eval_set(set_dir)
    keys, values = encode_records(encoder, triples_to_records(triples, "tail"), show_progress=True,
                                  cache_dir=cache_dir() / "eval")
    return EvalPool(triples, questions, keys, values, {t: i for i, t in enumerate(triples)})


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


def _left_pad(tok, prompts: list[str], device):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (n - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


@torch.no_grad()
def ask_batch(akv, questions: list[str], keys: torch.Tensor, values: torch.Tensor, max_new_tokens: int,
              record: bool, scale_factor: float | None, qemb: torch.Tensor | None, scale_mode: str | None = None):
    """Greedy answers for a batch against one KB. scale_factor / scale_mode default to the adapter's;
    scale_mode "none" turns the KB length correction off."""
    from .train import chat_text

    tok = akv.tokenizer
    ids, mask = _left_pad(tok, [chat_text(tok, q) for q in questions], akv.device)
    cfg = akv.adapter.config
    mode = scale_mode or cfg.kb_scale_mode
    scale = None if mode == "none" else (scale_factor if scale_factor is not None else cfg.kb_scale_factor)
    kb = KBInputs(keys, values, record=record, question_emb=qemb, scale_factor=scale,
                  scale_mode="shift" if mode == "none" else mode)
    stop = [tok.eos_token_id] + ([tok.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tok.get_vocab() else [])
    with use_kb(kb):
        out = akv.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=stop)
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    per_layer = None
    if record and kb.attention:
        m = mask.float()
        per_layer = torch.stack([(a * m[:, :, None]).sum(1) for a in kb.attention.values()])   # [L, B, N]
    return texts, per_layer


def eval_grounding(set_dir: str | Path, sizes: list[int], akv, encoder, n_questions: int = 500,
                   distractors: str = "random", seed: int = 0, batch_size: int = 16, answers: bool = True,
                   answer_questions: int | None = None, max_new_tokens: int = 32,
                   scale_factor: float | None = None, scale_mode: str | None = None,
                   progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    pool = load_pool(set_dir, encoder)
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(pool.questions))[: min(n_questions, len(pool.questions))]
    n_ans = len(qidx) if answer_questions is None else min(answer_questions, len(qidx))
    results = []
    needs_q = akv.adapter.config.question_input
    for size in sizes:
        size = min(size, len(pool.triples))
        t0 = time.time()
        hits1 = hits5 = n = em = em_prior = n_em = 0
        layer_hits = None
        chunks = list(kb_chunks(pool, qidx, size, distractors, np.random.default_rng([seed, size])))
        bar = tqdm(total=len(qidx), desc=f"{Path(set_dir).name} N={size}", disable=not progress)
        asked = 0
        for qs, rows in chunks:
            keys = torch.from_numpy(pool.keys[rows].astype(np.float32)).to(akv.device)
            values = torch.from_numpy(pool.values[rows].astype(np.float32)).to(akv.device)
            pos = {int(r): p for p, r in enumerate(rows)}
            for s in range(0, len(qs), batch_size):
                bq = [pool.questions[q] for q in qs[s:s + batch_size]]
                qtexts = [q.question for q in bq]
                qemb = torch.from_numpy(encoder.encode(qtexts)).to(akv.device) if needs_q else None
                want_answers = answers and asked < n_ans
                texts, per_layer = ask_batch(akv, qtexts, keys, values, max_new_tokens if want_answers else 1,
                                             True, scale_factor, qemb, scale_mode)
                gold = torch.tensor([pos[pool.index[q.triple]] for q in bq], device=per_layer.device)
                total = per_layer.sum(0)
                top5 = total.topk(min(5, total.shape[-1]), -1).indices
                hits1 += int((top5[:, 0] == gold).sum())
                hits5 += int((top5 == gold[:, None]).any(-1).sum())
                lh = (per_layer.argmax(-1) == gold[None]).sum(-1).cpu().numpy()
                layer_hits = lh if layer_hits is None else layer_hits + lh
                n += len(bq)
                if want_answers:
                    take = min(len(bq), n_ans - asked)
                    em += sum(contains_answer(t, q.tail) for t, q in zip(texts[:take], bq[:take]))
                    keep = torch.ones(len(rows), dtype=torch.bool)
                    keep[gold.cpu()] = False  # the batch's own facts removed: what the model knows without them
                    if keep.any():
                        pt, _ = ask_batch(akv, qtexts[:take], keys[keep], values[keep], max_new_tokens, False,
                                          scale_factor, qemb[:take] if qemb is not None else None, scale_mode)
                    else:
                        pt = [akv.generate(q, None, max_new_tokens=max_new_tokens) for q in qtexts[:take]]
                    em_prior += sum(contains_answer(t, q.tail) for t, q in zip(pt, bq[:take]))
                    n_em += take
                    asked += take
                bar.update(len(bq))
        bar.close()
        kb_layers = akv.adapter.config.kb_layers
        results.append({
            "kb_size": size, "pruned": False, "n_questions": n, "acc1": hits1 / n, "acc5": hits5 / n,
            "pruning_recall": None,
            "answer_em": em / n_em if n_em else None,
            "answer_em_without_gold": em_prior / n_em if n_em else None,
            "n_answer_questions": n_em,
            "acc1_by_layer": {str(l): float(h) / n for l, h in zip(kb_layers, layer_hits)},
            "seconds": round(time.time() - t0, 1),
        })
    cfg = akv.adapter.config
    mode = scale_mode or cfg.kb_scale_mode
    return {"set": Path(set_dir).name, "method": "atlaskv", "distractors": distractors, "seed": seed,
            "scale_factor": None if mode == "none" else (scale_factor if scale_factor is not None
                                                         else cfg.kb_scale_factor),
            "scale_mode": mode, "results": results}
