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

from typing import Sequence

import numpy as np
import torch

from atlaskv.kb.triples import Triple
from atlaskv.kb.records import triples_to_records
from atlaskv.model.chat import chat_text, left_pad, stop_token_ids

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


@torch.no_grad()
def answer_with_prompts(akv, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, no KB attention: the stock model on the written prompts (batched, left-padded)."""

    tok = akv.tokenizer
    ids, mask = left_pad(tok, [chat_text(tok, p) for p in prompts], akv.device)
    out = akv.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             eos_token_id=stop_token_ids(tok, akv.model))
    return tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def answer_with_shared_facts(akv, questions: list[str], facts: Sequence[str], max_new_tokens: int) -> list[str]:
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
    texts = []
    for q in questions:
        rest = tok(q + tail, add_special_tokens=False, return_tensors="pt")["input_ids"].to(akv.device)
        ids = torch.cat([prefix, rest], 1)
        out = akv.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=copy.deepcopy(cache),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=stop)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
