"""Knowledge-grounding evaluation (DESIGN §5 contract; method.md §6.1): AtlasKV (HiKVP-pruned) and KBLaM
(flat) KB attention here; the text-prompt baselines (rag, icl, zeroshot) in baselines.eval_text_method.

For KB size N: the KB holds every evaluated question's gold triple plus distractors from the set's pool
(seeded; `same-head` puts facts that share a head with an evaluated question first: pool.kb_chunks).
Questions are asked in batches against their KB, read through the same seam as `AtlasKV.ask` (a KBView and
`AtlasKV.kb_inputs`); from the prefill of the same generate() call:
  acc1 / acc5   the gold entry ranks first / in the top 5 of the KB attention summed over KB layers, heads
                and prompt tokens (per-layer figures under acc1_by_layer);
  answer_em     the gold tail appears in the greedy answer (case- and punctuation-insensitive);
  answer_em_without_gold   the same questions with their gold facts removed from the KB (the prior).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import LogitsProcessorList

from atlaskv.defaults import EVAL_MAX_NEW_TOKENS, LACKING_RATIO, VALUE_DECODING
from atlaskv.evaluation.metrics import answer_flags, contains_answer, rank_hits, says_refusal
from atlaskv.evaluation.pool import EvalPool, kb_chunks, load_pool, with_synthetic_fill
from atlaskv.kb.index import build_hierarchy
from atlaskv.defaults import TOP_CITATIONS
from atlaskv.model.refusal import backing, names_head, refuses, support_of
from atlaskv.model.decoding import spoken, value_processors
from atlaskv.model.chat import chat_text, ended_turns, left_pad, stop_token_ids
from atlaskv.model.kb_inputs import KBInputs, use_kb
from atlaskv.kb.view import KBView
from atlaskv.model.probes import lacking_fact
from atlaskv.model.pruning import PruneConfig


class Asked(NamedTuple):
    texts: list[str]          # the greedy answers
    kb: KBInputs              # with the prefill attention recorded
    mask: torch.Tensor        # the prompt mask [B, T] (left padding 0)
    ended: list[bool]         # the answer closed its turn within the token budget
    value_logprob: list | None = None  # per answer: the model's own log-prob of the top value (ValueDecoding)


@torch.no_grad()
def ask_batch(akv, questions: list[str], kb, max_new_tokens: int, record: bool = True,
              prune: PruneConfig | None = None, question_emb: torch.Tensor | None = None,
              scale_factor: float | None = None, value_decoding: bool = VALUE_DECODING) -> Asked:
    """Greedy answers for a batch of questions against one KB (a KBView or KnowledgeBase): flat, or HiKVP
    with `prune`. scale_factor defaults to the adapter's."""
    tok = akv.tokenizer
    ids, mask = left_pad(tok, [chat_text(tok, q) for q in questions], akv.device)
    kb_in = akv.kb_inputs(kb, record=record, prune=prune or False, question_emb=question_emb, token_mask=mask,
                          scale_factor=scale_factor)
    stop = stop_token_ids(tok, akv.model)  # EOS and the chat format's end of turn (<|im_end|>, <end_of_turn>)
    processors = LogitsProcessorList(value_processors(kb_in, tok, ids, mask, stop, value_decoding,
                                                      questions=questions, note_logprob=True))
    with use_kb(kb_in):
        out = akv.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=stop,
                                 logits_processor=processors)
    new = out[:, ids.shape[1]:]
    texts = [tok.decode(spoken(processors, b, row.tolist()), skip_special_tokens=True) for b, row in enumerate(new)]
    lp = next((p.value_logprob for p in processors if hasattr(p, "value_logprob")), None)
    return Asked(texts, kb_in, mask, ended_turns(new, stop), lp or None)


def cited_facts(view: KBView, rows, weights, k: int = TOP_CITATIONS) -> list:
    """The top-k cited (triple, weight) pairs of one sample, as `ask` returns them."""
    return list(zip(view.triples(rows[:k]), weights[:k].tolist()))


def refusal_signals(question: str, view: KBView, rows, weights, qvec: torch.Tensor,
                    value_logprob: float | None = None) -> dict:
    """What a refusal rule can read of one answer (saved with --save-answers): the top-cited fact, whether the
    question names its head, the cited facts and which of them backs an answer (refusal.backing), its value's
    support, the cosine between the question's and its key's
    sentence embeddings (also for the other cited facts), and the model's own log-probability of the top
    value's first token before value decoding's rules (its best step; ValueDecoding.value_logprob)."""
    cited = cited_facts(view, rows, weights)
    if not cited:
        return {"top_citation": None}
    keys = torch.from_numpy(view.keys.take(np.asarray(rows[:len(cited)], np.int64))).to(qvec)
    cos = torch.nn.functional.cosine_similarity(keys, qvec[None], dim=-1).tolist()
    sup = support_of(cited)
    return {"top_citation": list(cited[0][0]), "head_named": names_head(question, cited[0][0]),
            "backing": backing(question, cited), "cited": [list(t) for t, _ in cited],
            "support": round(sup, 4) if sup != float("inf") else None,
            "top_share_of_cited": round(cited[0][1] / sum(w for _, w in cited), 4),
            "key_cosine": [round(c, 4) for c in cos],
            "value_logprob": None if value_logprob is None else round(value_logprob, 4)}


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


@dataclass
class Tally:
    """Counts of one KB size, turned into its results row."""
    n_layers: int
    n: int = 0
    hits1: int = 0
    hits5: int = 0
    kept: int = 0
    layer_hits: np.ndarray = None
    n_em: int = 0
    em: int = 0
    em_prior: int = 0
    exact: int = 0          # answer_exact: what the user reads names the gold value cleanly (metrics.answer_flags)
    exact_prior: int = 0    # ... with the gold fact removed (the prior: what the KB did not give)
    loops: int = 0
    idk: int = 0            # the model's own "I don't know."
    idk_prior: int = 0
    em_r: int = 0           # with the refusal rule (refuse_below)
    em_prior_r: int = 0
    exact_r: int = 0
    exact_prior_r: int = 0
    refused: int = 0
    refused_prior: int = 0
    index_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layer_hits = np.zeros(self.n_layers)

    def add_hits(self, h: dict, n: int) -> None:
        self.hits1, self.hits5, self.kept = self.hits1 + h["hits1"], self.hits5 + h["hits5"], self.kept + h["kept"]
        self.layer_hits += np.array(h["layer_hits"])
        self.n += n

    def row(self, size: int, prune: PruneConfig | None, kb_layers: list[int], refuse_below, seconds: float) -> dict:
        n, n_em = self.n, self.n_em
        return {
            "kb_size": size, "pruned": prune is not None, "n_questions": n, "acc1": self.hits1 / n,
            "acc5": self.hits5 / n,
            "pruning_recall": self.kept / (n * len(kb_layers)) if prune is not None else None,
            "answer_em": self.em / n_em if n_em else None,
            "answer_em_without_gold": self.em_prior / n_em if n_em else None,
            "answer_exact": self.exact / n_em if n_em else None,
            "answer_exact_without_gold": self.exact_prior / n_em if n_em else None,
            "answer_loops": self.loops / n_em if n_em else None,
            "n_answer_questions": n_em,
            "own_refusals_with_gold": self.idk / n_em if n_em else None,
            "own_refusals_without_gold": self.idk_prior / n_em if n_em else None,
            **({"answer_em_with_refusal": self.em_r / n_em, "answer_em_without_gold_with_refusal": self.em_prior_r / n_em,
                "answer_exact_with_refusal": self.exact_r / n_em,
                "answer_exact_without_gold_with_refusal": self.exact_prior_r / n_em,
                "refused_with_gold": self.refused / n_em, "refused_without_gold": self.refused_prior / n_em}
               if refuse_below is not None and n_em else {}),
            "acc1_by_layer": {str(l): float(h) / n for l, h in zip(kb_layers, self.layer_hits)},
            "seconds": round(seconds, 1),
            **({"index_seconds": round(self.index_s, 2)} if prune is not None else {}),
            **self.extra,
        }


@dataclass
class GroundingRun:
    """The fixed settings of one eval_grounding call."""
    akv: object
    encoder: object
    pool: EvalPool
    prune: PruneConfig | None
    batch_size: int
    answers: bool
    n_ans: int
    max_new_tokens: int
    scale_factor: float | None
    refuse_below: float | None
    seed: int
    saved: list | None = None   # --save-answers: one row per answered question
    value_decoding: bool = VALUE_DECODING
    lacking_ratio: float = LACKING_RATIO

    @property
    def needs_q(self) -> bool:
        return self.akv.adapter.config.question_input or (self.prune is not None and self.prune.route != "kbq")

    def chunk_view(self, rows: np.ndarray, tally: Tally) -> KBView:
        """The KB of one chunk of questions; pruned runs get a tree built over exactly it."""
        keys = self.pool.keys[rows].astype(np.float32)
        tree = None
        if self.prune is not None:
            t0 = time.time()
            tree = build_hierarchy(keys, seed=self.seed)
            tally.index_s += time.time() - t0
        return KBView.from_arrays(keys, self.pool.values[rows].astype(np.float32),
                                  [self.pool.triples[r] for r in rows], tree)

    def batch(self, bq: list, view: KBView, pos: dict, tally: Tally, kb_values: list[str]) -> None:
        """One batch of questions: grounding from the prefill, then (while answers are wanted) the answers
        with and without their gold facts."""
        akv = self.akv
        qtexts = [q.question for q in bq]
        qemb = torch.from_numpy(self.encoder.encode(qtexts)).to(akv.device) if self.needs_q else None
        want_answers = self.answers and tally.n_em < self.n_ans
        asked = ask_batch(akv, qtexts, view, self.max_new_tokens if want_answers else 1, True, self.prune, qemb,
                          self.scale_factor, self.value_decoding)
        texts, kb, mask, ended = asked.texts, asked.kb, asked.mask, asked.ended
        lps = asked.value_logprob or [None] * len(bq)
        gold = torch.tensor([pos[self.pool.index[q.triple]] for q in bq], device=akv.device)
        tally.add_hits(grounding_hits(kb, mask, gold), len(bq))
        if not want_answers:
            return
        take = min(len(bq), self.n_ans - tally.n_em)
        right = [contains_answer(t, q.tail) for t, q in zip(texts[:take], bq[:take])]
        flags = [answer_flags(t, q.tail, kb_values, e, q.question) for t, q, e in zip(texts, bq, ended[:take])]
        tally.em += sum(right)
        tally.exact += sum(f["exact"] for f in flags)
        tally.loops += sum(f["loop"] for f in flags)
        tally.idk += sum(map(says_refusal, texts[:take]))
        ranked = kb.summed_attention(mask)[:take]
        cited = kb.cited_rows(mask)[:take]
        qvec = qemb if qemb is not None or self.saved is None else \
            torch.from_numpy(self.encoder.encode(qtexts)).to(akv.device)
        signals = [refusal_signals(q, view, rows, w, qvec[i], lps[i])
                   for i, (q, (rows, w)) in enumerate(zip(qtexts, cited))] if self.saved is not None else None
        lacking = self.lacking(kb, qtexts[:take], signals)
        if self.refuse_below is not None:
            kept = [not refuses(q, cited_facts(view, rows, w), self.refuse_below, answer=t, lacking=lk,
                                lacking_ratio=self.lacking_ratio)
                    for q, (rows, w), t, lk in zip(qtexts, cited, texts, lacking)]
            tally.em_r += sum(r and k for r, k in zip(right, kept))
            tally.exact_r += sum(f["exact"] and k for f, k in zip(flags, kept))
            tally.refused += take - sum(kept)
        prior = self.without_gold(qtexts[:take], bq[:take], view, gold.cpu().numpy(), qemb, tally, kb_values, qvec)
        if self.saved is not None:
            self.save(bq[:take], texts, flags, ranked, view, prior, signals)
        tally.n_em += take

    def lacking(self, kb_in: KBInputs, questions: list[str], signals: list[dict] | None) -> list[float | None]:
        """Per question, the lacking-key ratio the refusal rule reads (probes.py); with saved answers, also
        the signal over every relation, those the adapter never saw included, with no template filter
        (`lacking_every_relation`), and over the pairs the shipped check leaves out, one relation of a kind
        the adapter never saw (`lacking_unseen`, with the filter), into their signals."""
        out = []
        for i, q in enumerate(questions):
            lk = lacking_fact(self.akv.adapter, self.encoder, kb_in, q, i) \
                if self.refuse_below is not None or signals is not None else None
            out.append(None if lk is None else lk.ratio)
            if signals is not None and signals[i] is not None:
                every = lacking_fact(self.akv.adapter, self.encoder, kb_in, q, i, relations="every",
                                     nearer_only=False)
                unseen = lacking_fact(self.akv.adapter, self.encoder, kb_in, q, i, relations="unseen")
                signals[i].update({name: None if x is None else {"relation": x.relation, "ratio": x.ratio,
                                                                 "top": [list(t) for t in x.top]}
                                   for name, x in (("lacking", lk), ("lacking_every_relation", every),
                                                   ("lacking_unseen", unseen))})
        return out

    def save(self, bq: list, texts: list[str], flags: list[dict], ranked: list, view: KBView, prior: list,
             signals: list[dict]):
        for q, t, f, (pos, w), p, sig in zip(bq, texts, flags, ranked, prior, signals):
            top = view.triples(pos[:1].cpu().numpy())[0] if len(pos) else None
            self.saved.append({"question": q.question, "gold": q.tail, "answer": t.strip(), **f,
                               "top_citation": list(top) if top else None,
                               "top_share": round(float(w[0] / w.sum()), 4) if len(pos) else None,
                               "top_is_gold": top == q.triple, "answer_without_gold": p[0].strip(),
                               "exact_without_gold": p[1], "signals": sig, "signals_without_gold": p[2]})

    def without_gold(self, qtexts: list[str], bq: list, view: KBView, gold: np.ndarray, qemb, tally: Tally,
                     kb_values: list[str], qvec=None) -> list[tuple]:
        """The same questions with the batch's own facts removed: what the model knows without them."""
        take = len(qtexts)
        rec = self.refuse_below is not None or self.saved is not None
        kb_p, signals, lps = None, [None] * take, [None] * take
        if view.rows <= len(set(gold.tolist())):  # nothing left: no KB
            pt = [self.akv.generate(q, None, max_new_tokens=self.max_new_tokens, value_decoding=self.value_decoding)
                  for q in qtexts]
            ended = [True] * take  # generate() strips the stop token; the exact flag then reads the text alone
        else:  # flat: the other rows; pruned: the same tree with the gold leaves tombstoned
            asked = ask_batch(self.akv, qtexts, view.without(gold), self.max_new_tokens, rec, self.prune,
                              qemb[:take] if qemb is not None else None, self.scale_factor, self.value_decoding)
            pt, kb_p, mask_p, ended = asked.texts, asked.kb, asked.mask, asked.ended
            lps = asked.value_logprob or lps
        right = [contains_answer(t, q.tail) for t, q in zip(pt, bq)]
        tally.em_prior += sum(right)
        exact = [answer_flags(t, q.tail, kb_values, e, q.question)["exact"] for t, q, e in zip(pt, bq, ended)]
        tally.exact_prior += sum(exact)
        tally.idk_prior += sum(map(says_refusal, pt))
        cited = kb_p.cited_rows(mask_p) if kb_p is not None else None
        if cited is not None and self.saved is not None:
            signals = [refusal_signals(q, view, rows, w, qvec[i], lps[i])
                       for i, (q, (rows, w)) in enumerate(zip(qtexts, cited))]
        lacking = self.lacking(kb_p, qtexts, signals if self.saved is not None else None) if cited else []
        if self.refuse_below is not None:  # an empty KB backs nothing: refused
            kept = [False] * take if cited is None else \
                [not refuses(q, cited_facts(view, rows, w), self.refuse_below, answer=t, lacking=lk,
                             lacking_ratio=self.lacking_ratio)
                 for q, (rows, w), t, lk in zip(qtexts, cited, pt, lacking)]
            tally.em_prior_r += sum(r and k for r, k in zip(right, kept))
            tally.exact_prior_r += sum(x and k for x, k in zip(exact, kept))
            tally.refused_prior += take - sum(kept)
        return [(t, x, sig) for t, x, sig in zip(pt, exact, signals)]


def eval_grounding(set_dir: str | Path, sizes: list[int], akv, encoder, n_questions: int = 500,
                   distractors: str = "random", seed: int = 0, batch_size: int = 16, answers: bool = True,
                   answer_questions: int | None = None, max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                   scale_factor: float | None = None, prune: PruneConfig | None = None, progress: bool = True,
                   synthetic_fill: bool = False, refuse_below: float | None = None,
                   save_answers: str | Path | None = None, value_decoding: bool = VALUE_DECODING,
                   lacking_ratio: float = LACKING_RATIO) -> dict:
    """`prune`: HiKVP over a tree built for each KB (its build time is reported as index_seconds).
    `synthetic_fill`: sizes past the set's pool are reached with synthetic distractors (reported per row).
    `refuse_below`: also score the answers as `ask` / `serve` give them, with the refusal rule on (atlaskv.refuses:
    the top-cited fact is about an entity the question does not name, or its value's support is under this and
    the answer does not name it, or a fact the KB lacks about its entity draws the question `lacking_ratio` times
    more: probes.py, 0 = off) the answer becomes "I don't know." and counts as wrong (extra fields
    `*_with_refusal`, `refused*`).
    `save_answers`: a JSONL file with every answered question: answer, gold, top citation, answer_flags.
    `value_decoding`: answers decoded as `ask` decodes them (model/decoding.py); off: free greedy decoding."""
    from tqdm.auto import tqdm

    pool = real = load_pool(set_dir, encoder)
    if synthetic_fill and max(sizes) > len(pool.triples):
        pool = with_synthetic_fill(pool, max(sizes), seed)
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(pool.questions))[: min(n_questions, len(pool.questions))]
    n_ans = len(qidx) if answer_questions is None else min(answer_questions, len(qidx))
    run = GroundingRun(akv, encoder, pool, prune, batch_size, answers, n_ans, max_new_tokens, scale_factor,
                       refuse_below, seed, [] if save_answers else None, value_decoding, lacking_ratio)
    kb_layers = akv.adapter.config.kb_layers
    results = []
    for size in sizes:
        size = min(size, len(pool.triples))
        t0 = time.time()
        tally = Tally(len(kb_layers))
        if size > len(real.triples):
            tally.extra["synthetic_entries"] = size - len(real.triples)
        bar = tqdm(total=len(qidx), desc=f"{Path(set_dir).name} N={size}{' pruned' if prune else ''}",
                   disable=not progress)
        for qs, rows in list(kb_chunks(pool, qidx, size, distractors, np.random.default_rng([seed, size]))):
            view = run.chunk_view(rows, tally)
            pos = {int(r): p for p, r in enumerate(rows)}
            kb_values = sorted({pool.triples[r].tail for r in rows})
            for s in range(0, len(qs), batch_size):
                bq = [pool.questions[q] for q in qs[s:s + batch_size]]
                n_saved = len(run.saved or [])
                run.batch(bq, view, pos, tally, kb_values)
                for row in (run.saved or [])[n_saved:]:
                    row.update(kb_size=size, pruned=prune is not None)
                bar.update(len(bq))
        bar.close()
        results.append(tally.row(size, prune, kb_layers, refuse_below, time.time() - t0))
    out = {"set": Path(set_dir).name, "method": "atlaskv", "distractors": distractors, "seed": seed,
           "scale_factor": scale_factor if scale_factor is not None else akv.adapter.config.kb_scale_factor,
           "results": results}
    if refuse_below is not None:
        out["refuse_below"], out["lacking_ratio"] = refuse_below, lacking_ratio
    if prune is not None:
        out["prune"] = {"top_k": list(prune.top_k), "route": prune.route, "per_head": prune.per_head,
                        "reuse": prune.reuse, "scale_n": prune.scale_n, "shortlist": prune.shortlist}
    if save_answers:
        Path(save_answers).parent.mkdir(parents=True, exist_ok=True)
        Path(save_answers).write_text("".join(json.dumps({"set": out["set"], **r}) + "\n" for r in run.saved),
                                      encoding="utf-8")
    return out
