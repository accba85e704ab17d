"""Token-embedding values (adapters with value_source "encoder+llm_tokens", see adapter.py).

    t(text) = mean of the base LLM's input-embedding rows of the first `n_tokens` tokens of " " + text

The text is tokenised as it follows "... is" in an answer (leading space), so its first token is the one
the model has to emit. Nothing new is stored in a KB: an embedding-table row is a lookup, so the token
part of any KB's values (built with any version of atlaskv) is derived from its value texts when a
model reads it, and the KB stays independent of the LLM.

Copy values ("encoder+llm_copy") append the value's token ids as float columns (exact below 2^24):
[id of the first token without the leading space; ids of the first `copy_tokens` tokens of " " + text],
-1 past the end. They ride along every KB path (flat, per-sample slices, pruned gathers) with zero
projection weight, and attention.py reads them to write the value's next token once its first is out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class TokenValues:
    """value texts -> float32 [n, hidden]."""

    def __init__(self, model, tokenizer, n_tokens: int = 1, copy_tokens: int = 0):
        self.table = model.get_input_embeddings().weight.detach()
        self.tokenizer, self.n_tokens, self.copy_tokens = tokenizer, n_tokens, copy_tokens
        self.dim = int(self.table.shape[1]) + (copy_tokens + 1 if copy_tokens else 0)
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 4096) -> np.ndarray:
        texts = list(texts)
        if len(self._memo) > 1_000_000:  # a long-running server: keep memory bounded
            self._memo.clear()
        uniq = list(dict.fromkeys(t for t in texts if t not in self._memo))
        pad = self.tokenizer.eos_token_id or 0
        for s in range(0, len(uniq), batch_size):
            chunk = uniq[s:s + batch_size]
            ids = self.tokenizer([" " + t.strip() for t in chunk], add_special_tokens=False)["input_ids"]
            bares = (self.tokenizer([t.strip() for t in chunk], add_special_tokens=False)["input_ids"]
                     if self.copy_tokens else ids)
            with torch.no_grad():
                for t, row, bare in zip(chunk, ids, bares):
                    first = torch.tensor(row[:self.n_tokens] or [pad], device=self.table.device)
                    v = self.table[first].float().mean(0).cpu().numpy()
                    if self.copy_tokens:
                        ids_m = (row[:self.copy_tokens] or [pad]) + [-1] * self.copy_tokens
                        v = np.concatenate([v, np.array((bare[:1] or [-1]) + ids_m[:self.copy_tokens], np.float32)])
                    self._memo[t] = v
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i] = self._memo[t]
        return out


def token_values(adapter, model, tokenizer) -> TokenValues:
    """One TokenValues per model (its table and memo are shared by every KB the model reads)."""
    tv = getattr(model, "_atlaskv_token_values", None)
    copy = adapter.config.copy_tokens if adapter.config.copy_values else 0
    if tv is None or (tv.n_tokens, tv.copy_tokens) != (adapter.config.value_tokens, copy):
        tv = TokenValues(model, tokenizer, adapter.config.value_tokens, copy)
        model._atlaskv_token_values = tv
    return tv


def value_embeddings(adapter, model, tokenizer, value_texts: Sequence[str], encoder_values: np.ndarray) -> np.ndarray:
    """The value inputs `adapter` reads for these records: the stored sentence embeddings, with the
    values' token embeddings appended for token-value adapters."""
    if not adapter.config.token_values:
        return encoder_values
    t = token_values(adapter, model, tokenizer).encode(value_texts)
    return np.concatenate([np.asarray(encoder_values, np.float32), t], 1)


class TokenValueSource:
    """A pruned KB's value rows with the token part appended: stored sentence embeddings from `base`, the
    token embeddings of the rows' value texts (read only for the rows a search keeps, remembered per row)."""

    def __init__(self, base, value_texts, tokens: TokenValues, memo_rows: int = 200_000):
        self.base, self.value_texts, self.tokens = base, value_texts, tokens
        self.memo: dict[int, np.ndarray] = {}
        self.memo_rows = memo_rows

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        e = self.base.take(positions)
        todo = sorted({int(p) for p in positions if int(p) not in self.memo})
        if todo:
            if len(self.memo) + len(todo) > self.memo_rows:
                self.memo.clear()
            for p, t in zip(todo, self.tokens.encode(self.value_texts(np.array(todo, np.int64)))):
                self.memo[p] = t
        t = np.stack([self.memo[int(p)] for p in positions]) if len(positions) else np.zeros((0, self.tokens.dim), np.float32)
        return np.concatenate([e, t], 1)
