"""The evaluation pool: a set's triples and questions with their embeddings, and the KBs cut from it (the
gold facts of the questions asked plus seeded distractors, DESIGN §5)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlaskv.kb.encoder import encode_records
from atlaskv.kb.records import triples_to_records
from atlaskv.kb.triples import EvalQuestion, Triple, read_eval_set


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


def with_synthetic_fill(pool: EvalPool, total: int, seed: int = 0) -> EvalPool:
    """The pool grown to `total` entries with synthetic distractors (real embeddings plus noise, as
    `bench scale` makes them): KB sizes past the real data, for search-quality sweeps. Questions stay real."""
    extra = total - len(pool.triples)
    if extra <= 0:
        return pool
    rng = np.random.default_rng([seed, total])
    src = rng.integers(0, len(pool.keys), extra)
    keys, values = jitter(pool.keys[src], 0.35, rng), jitter(pool.values[src], 0.35, rng)
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


def jitter(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Real embeddings made into synthetic neighbours: Gaussian noise, then back onto the unit sphere."""
    out = np.empty(x.shape, np.float16)
    for s in range(0, len(x), 200_000):
        y = x[s:s + 200_000].astype(np.float32)
        y += rng.standard_normal(y.shape, dtype=np.float32) * (noise / np.sqrt(y.shape[1]))
        out[s:s + 200_000] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return out
