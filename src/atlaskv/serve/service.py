"""The served model and KB, one call at a time: what the HTTP routes (routes.py) ask of them.

KBService owns the model, the live KB, the lock and its bounded queue, and the request limits; it answers,
updates the KB, and reads it for the web page (overview, search over heads). It knows nothing of HTTP: a
request it will not serve raises ServiceError, whose `kind` the routes map to a status.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from atlaskv.defaults import MAX_NEW_TOKENS, PRUNE_ROUTE, PRUNE_TOP_K, REFUSE_BELOW, TOP_CITATIONS
from atlaskv.kb.store import KBError, KnowledgeBase, UpdateResult

ErrorKind = Literal["invalid", "queue_full", "kb_busy"]
FACT_COLUMNS = ["head", "relation", "tail"]
MAX_SEARCH = 500  # triples one search returns at most


class ServiceError(Exception):
    """A request the service refuses. kind: invalid (the request itself), queue_full (retry later),
    kb_busy (another writer holds the KB); code: a short machine-readable reason."""

    def __init__(self, kind: ErrorKind, message: str, code: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.code = kind, message, code


class Worker:
    """Serialises every model call and KB update (a lock), with at most `max_queue` callers waiting."""

    def __init__(self, max_queue: int):
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(max_queue + 1)

    def reserve(self) -> None:
        if not self.slots.acquire(blocking=False):
            raise ServiceError("queue_full", "server busy: too many queued requests, retry later")

    @contextmanager
    def turn(self):
        """Hold the model; the slot taken by reserve() is given back afterwards."""
        try:
            with self.lock:
                yield
        finally:
            self.slots.release()

    def call(self, fn):
        self.reserve()
        with self.turn():
            return fn()


class LiveKB:
    """The served KB; reopened when another process (`atlaskv kb add`) replaced its manifest."""

    def __init__(self, kb: KnowledgeBase):
        self.kb, self.stamp = kb, self.mtime(kb.path)

    @staticmethod
    def mtime(path: Path) -> int:
        return (Path(path) / "manifest.json").stat().st_mtime_ns

    def current(self) -> KnowledgeBase:  # call with the worker lock held
        stamp = self.mtime(self.kb.path)
        if stamp != self.stamp:
            self.kb, self.stamp = KnowledgeBase.open(self.kb.path), stamp
        return self.kb


@dataclass(frozen=True)
class ChatJob:
    """A checked chat request: the conversation and the generate() settings."""
    messages: list[dict]
    gen: dict  # max_new_tokens, and do_sample/temperature/top_p when sampling

    @property
    def max_new_tokens(self) -> int:
        return self.gen["max_new_tokens"]


@dataclass(frozen=True)
class Reply:
    """An answered ChatJob. answer: the model's Answer (text, citations, support, refused)."""
    answer: object
    prompt_tokens: int
    completion_tokens: int
    kb_version: int
    max_new_tokens: int

    @property
    def truncated(self) -> bool:
        """The answer used its whole token budget (OpenAI finish_reason "length")."""
        return self.completion_tokens >= self.max_new_tokens


class KBChange(NamedTuple):
    result: UpdateResult  # added, duplicates / removed, not_found, version
    triples: int          # live triples after the change


class StreamRun:
    """One streamed generation, already started: iterate for its text pieces, then finish() for its Reply."""

    def __init__(self, streamer, work):
        self.streamer, self.reply, self.error = streamer, None, None
        # started here, not when iterated: the slot is given back even if the client leaves before reading
        self.thread = threading.Thread(target=self.run, args=(work,), daemon=True)
        self.thread.start()

    def run(self, work) -> None:
        try:
            self.reply = work()
        except BaseException as e:  # raised again by finish()
            self.error = e
            self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        return iter(self.streamer)

    def finish(self) -> Reply:
        """Wait for the generation; its error, if any, is raised here."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.reply


class KBService:
    """`model` (an AtlasKV) answering over `kb`, one call at a time, at most `max_queue` waiting.
    refuse_below: answer "I don't know." when no fact stands out (Answer.or_refusal; 0 = never).
    top_k, route: HiKVP search when the KB has an index; top_citations: cited facts per answer."""

    def __init__(self, model, kb: KnowledgeBase | str | Path, *, model_name: str | None = None,
                 max_messages: int = 64, max_tokens: int = 512, default_max_tokens: int = MAX_NEW_TOKENS,
                 max_prompt_tokens: int = 2048, max_triples: int = 10_000, max_queue: int = 64,
                 refuse_below: float = REFUSE_BELOW, top_k: tuple[int, int, int] = PRUNE_TOP_K,
                 route: str = PRUNE_ROUTE, top_citations: int = TOP_CITATIONS):
        from atlaskv.model.pruning import PruneConfig

        self.model = model
        self.live = LiveKB(kb if isinstance(kb, KnowledgeBase) else KnowledgeBase.open(kb))
        self.name = model_name or f"atlaskv-{model.adapter.config.base_model}"
        self.created = int(time.time())  # the model's "created" in /v1/models
        self.worker = Worker(max_queue)
        self.max_messages, self.max_tokens, self.default_max_tokens = max_messages, max_tokens, default_max_tokens
        self.max_prompt_tokens, self.max_triples, self.refuse_below = max_prompt_tokens, max_triples, refuse_below
        self.ask_options = {"prune_config": PruneConfig(top_k=top_k, route=route), "top_citations": top_citations}
        self.facts_cache: tuple[tuple[str, int], pa.Table] | None = None  # (KB path, version) -> its facts

    # ------------------------------------------------------------ chat
    def chat_job(self, messages: list[dict], max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None) -> ChatJob:
        """Check a conversation ({"role", "content"} dicts) against the limits; max_tokens None: the default."""
        if len(messages) > self.max_messages:
            raise ServiceError("invalid", f"{len(messages)} messages, at most {self.max_messages}",
                               "too_many_messages")
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise ServiceError("invalid", "no user message with a question", "no_question")
        n = max_tokens or self.default_max_tokens
        if n > self.max_tokens:
            raise ServiceError("invalid", f"max_tokens {n} is over this server's limit of {self.max_tokens}",
                               "max_tokens")
        gen = {"max_new_tokens": n}
        if temperature:  # None or 0: greedy, the setting the adapter was trained and evaluated with
            gen.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0)
        return ChatJob(messages, gen)

    def answer(self, job: ChatJob) -> Reply:
        """Wait for the model (blocking), then answer: ServiceError queue_full when too many wait."""
        return self.worker.call(lambda: self.generate(job))

    def stream(self, job: ChatJob) -> StreamRun:
        """Start answering in a thread; the queue slot is taken now, so a full queue raises here."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.worker.reserve()

        def work() -> Reply:
            with self.worker.turn():
                return self.generate(job, streamer)

        return StreamRun(streamer, work)

    def generate(self, job: ChatJob, streamer=None) -> Reply:
        """Run with the worker lock held."""
        kb = self.live.current()
        n_prompt = self.model.chat_ids(job.messages).shape[1]
        if n_prompt > self.max_prompt_tokens:
            raise ServiceError("invalid", f"prompt is {n_prompt} tokens, at most {self.max_prompt_tokens}",
                               "prompt_too_long")
        if streamer is not None and self.refuse_below > 0:
            # the rule reads the prefill's attention: decide before any token goes out (one prefill more)
            pre = self.model.ask(job.messages, kb, max_new_tokens=1, **self.ask_options).or_refusal(self.refuse_below)
            if pre.refused:
                streamer.end()
                return self.reply(pre, n_prompt, kb, job)
        ans = self.model.ask(job.messages, kb, streamer=streamer, **self.ask_options, **job.gen)
        if self.refuse_below > 0:
            ans = ans.or_refusal(self.refuse_below)
        return self.reply(ans, n_prompt, kb, job)

    def reply(self, ans, n_prompt: int, kb: KnowledgeBase, job: ChatJob) -> Reply:
        n_out = len(self.model.tokenizer(ans.text, add_special_tokens=False)["input_ids"])
        return Reply(ans, n_prompt, n_out, kb.version, job.max_new_tokens)

    # ------------------------------------------------------------ the KB
    def add(self, triples: list[tuple[str, str, str]]) -> KBChange:
        """Add triples live (blocking, one at a time with the answers)."""
        return self.update("add", triples)

    def remove(self, triples: list[tuple[str, str, str]]) -> KBChange:
        """Remove triples live; unknown ones are counted as not found."""
        return self.update("remove", triples)

    def update(self, op: Literal["add", "remove"], triples: list[tuple[str, str, str]]) -> KBChange:
        if len(triples) > self.max_triples:
            raise ServiceError("invalid", f"{len(triples)} triples, at most {self.max_triples} per request",
                               "too_many_triples")
        if any("\x00" in f for t in triples for f in t):  # the file readers refuse NUL too (kb/triples.py)
            raise ServiceError("invalid", "invalid request: a triple field holds a NUL character", "invalid_request")

        def go() -> KBChange:
            kb = self.live.current()
            try:
                res = getattr(kb, op)(triples)
            except KBError as e:  # e.g. another process is writing the KB right now
                raise ServiceError("kb_busy", str(e), "kb_busy") from None
            self.live.current()  # our own write replaced the manifest: take its new stamp
            return KBChange(res, len(kb))

        return self.worker.call(go)

    def kb_status(self) -> tuple[int, int]:
        """(version, live triples) of the KB as last read; does not wait for the model."""
        kb = self.live.kb
        return kb.version, len(kb)

    # ------------------------------------------------------------ reading the KB (the web page's KB panel)
    def overview(self) -> dict:
        """Size, version, encoder and relations (with their fact counts) of the KB, read in turn with the
        answers and updates: it shows every update made before it."""
        def go() -> dict:
            kb = self.live.current()
            counts = pc.value_counts(self.facts(kb).column("relation")).to_pylist()
            relations = sorted(({"relation": c["values"], "count": c["counts"]} for c in counts),
                               key=lambda r: (-r["count"], r["relation"]))
            info = kb.info()
            return {"model": self.name, "version": kb.version, "triples": len(kb), "entries": info["entries"],
                    "encoder": kb.encoder_name, "dim": kb.dim, "directions": info["directions"],
                    "indexed": info["index"] is not None, "refuse_below": self.refuse_below,
                    "relations": relations}

        return self.worker.call(go)

    def search(self, text: str, limit: int = 50) -> dict:
        """Facts whose head contains `text` (any case): exact heads first, then heads that start with it,
        then the rest, each group sorted; at most `limit`. Empty text: the first facts by head."""
        if len(text) > 2000:
            raise ServiceError("invalid", "search text over 2000 characters", "invalid_request")
        if not 1 <= limit <= MAX_SEARCH:
            raise ServiceError("invalid", f"limit must be 1 to {MAX_SEARCH}, got {limit}", "invalid_request")

        def go() -> dict:
            kb = self.live.current()
            facts = self.facts(kb)
            text_ = text.strip()
            if text_:
                heads = facts.column("head")
                facts = facts.filter(pc.match_substring(heads, text_, ignore_case=True))
                heads = facts.column("head")
                rank = pc.if_else(pc.equal(pc.utf8_lower(heads), text_.lower()), 0,
                                  pc.if_else(pc.starts_with(heads, text_, ignore_case=True), 1, 2))
                facts = facts.append_column("rank", rank).sort_by("rank").drop_columns(["rank"])  # stable
            return {"query": text_, "version": kb.version, "total": facts.num_rows,
                    "triples": facts.slice(0, limit).to_pylist()}

        return self.worker.call(go)

    def facts(self, kb: KnowledgeBase) -> pa.Table:
        """The KB's live triples (head, relation, tail), each once, sorted; kept until the KB changes.
        Call with the worker lock held."""
        key = (str(kb.path), kb.version)
        if self.facts_cache is None or self.facts_cache[0] != key:
            t = kb.records().select(FACT_COLUMNS).group_by(FACT_COLUMNS).aggregate([])
            self.facts_cache = key, t.sort_by([(c, "ascending") for c in FACT_COLUMNS])
        return self.facts_cache[1]
