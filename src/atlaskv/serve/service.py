"""The served model and KB: what the HTTP routes (routes.py) ask of them.

KBService owns the model (driven by one Scheduler thread that answers chat requests together, scheduler.py),
the live KB, its writer (one thread applying queued adds and removes, writer.py) and the request limits; it
answers, updates the KB, and reads it for the web page (overview, search over heads). Answers and writes never
wait for each other: an answer reads the KB snapshot of the moment it was admitted, and a write is committed
(KnowledgeBase writes new files and swaps the manifest) and its snapshot published before it is acknowledged,
so every request admitted after the acknowledgement sees it, and none sees half of it. It knows nothing of HTTP: a request it will not serve raises
ServiceError, whose `kind` the routes map to a status.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from atlaskv.defaults import LACKING_RATIO, MAX_BATCH, MAX_NEW_TOKENS, PRUNE_ROUTE, PRUNE_TOP_K, REFUSE_BELOW, TOP_CITATIONS
from atlaskv.kb.store import KBError, KnowledgeBase, UpdateResult
from atlaskv.model.batching import PromptTooLong
from atlaskv.serve.scheduler import QueueFull, Scheduler, Ticket
from atlaskv.serve.writer import KBWriter, WriteQueueFull

ErrorKind = Literal["invalid", "queue_full", "kb_busy"]
FACT_COLUMNS = ["head", "relation", "tail"]
MAX_SEARCH = 500  # triples one search returns at most


class ServiceError(Exception):
    """A request the service refuses. kind: invalid (the request itself), queue_full (retry later),
    kb_busy (another writer holds the KB); code: a short machine-readable reason."""

    def __init__(self, kind: ErrorKind, message: str, code: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.code = kind, message, code


class LiveKB:
    """The served KB: the snapshot requests read. Replaced by our own writes (publish) and reopened when
    another process (`atlaskv kb add`) replaced its manifest. A snapshot is read in (its tombstones, its tree)
    before anyone sees it: the next write deletes the files only that version named, and an answer admitted
    just before that write still reads it."""

    def __init__(self, kb: KnowledgeBase):
        self.kb, self.stamp = self.ready(kb), self.mtime(kb.path)
        self.lock = threading.Lock()

    @staticmethod
    def mtime(path: Path) -> int:
        return (Path(path) / "manifest.json").stat().st_mtime_ns

    @staticmethod
    def ready(kb: KnowledgeBase) -> KnowledgeBase:
        kb.view()  # loads and keeps the table (live rows) and the HiKVP tree of this version
        return kb

    def current(self) -> KnowledgeBase:
        """The newest committed version (a KnowledgeBase no writer changes any more)."""
        with self.lock:
            stamp = self.mtime(self.kb.path)
            if stamp != self.stamp:
                self.kb, self.stamp = self.ready(KnowledgeBase.open(self.kb.path)), stamp
            return self.kb

    def publish(self, kb: KnowledgeBase) -> None:
        self.ready(kb)
        with self.lock:
            self.kb, self.stamp = kb, self.mtime(kb.path)


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


class TextPieces:
    """A streamed answer's text as it is decoded, handed piece by piece to an asyncio loop (the HTTP
    server's): transformers' TextStreamer decides where a piece ends (whole words), the loop reads them."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop):
        from transformers import TextStreamer

        pieces = self

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if text:
                    loop.call_soon_threadsafe(pieces.queue.put_nowait, text)
                if stream_end:
                    loop.call_soon_threadsafe(pieces.queue.put_nowait, None)

        self.queue: asyncio.Queue = asyncio.Queue()
        self.streamer = Streamer(tokenizer, skip_prompt=False, skip_special_tokens=True)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (piece := await self.queue.get()) is not None:
            yield piece


class StreamRun:
    """One streamed answer, already submitted: iterate (async) for its text pieces, then finish() for its Reply."""

    def __init__(self, pieces: TextPieces, ticket: Ticket, service: "KBService"):
        self.pieces, self.ticket, self.service = pieces, ticket, service

    def __aiter__(self) -> AsyncIterator[str]:
        return self.pieces.__aiter__()

    async def finish(self) -> Reply:
        """Wait for the answer; its error, if any, is raised here."""
        return await self.service.reply_when_done(self.ticket)


class KBService:
    """`model` (an AtlasKV) answering over `kb`: at most `max_batch` answers decoded together, at most
    `max_queue` chat requests and as many KB writes waiting (more: ServiceError queue_full).
    refuse_below: answer "I don't know." when no fact stands out (Answer.or_refusal; 0 = never);
    lacking_ratio: ... or when a fact the KB lacks draws the question that many times more (0 = never).
    top_k, route: HiKVP search when the KB has an index; top_citations: cited facts per answer."""

    def __init__(self, model, kb: KnowledgeBase | str | Path, *, model_name: str | None = None,
                 max_messages: int = 64, max_tokens: int = 512, default_max_tokens: int = MAX_NEW_TOKENS,
                 max_prompt_tokens: int = 2048, max_triples: int = 10_000, max_queue: int = 64,
                 max_batch: int = MAX_BATCH, refuse_below: float = REFUSE_BELOW,
                 lacking_ratio: float = LACKING_RATIO, top_k: tuple[int, int, int] = PRUNE_TOP_K, route: str = PRUNE_ROUTE,
                 top_citations: int = TOP_CITATIONS):
        from atlaskv.model.pruning import PruneConfig

        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be at least 1 and max_queue at least 0, got {max_batch}, {max_queue}")
        self.model = model
        self.live = LiveKB(kb if isinstance(kb, KnowledgeBase) else KnowledgeBase.open(kb))
        self.name = model_name or f"atlaskv-{model.adapter.config.base_model}"
        self.created = int(time.time())  # the model's "created" in /v1/models
        self.max_messages, self.max_tokens, self.default_max_tokens = max_messages, max_tokens, default_max_tokens
        self.max_prompt_tokens, self.max_triples, self.refuse_below = max_prompt_tokens, max_triples, refuse_below
        self.lacking_ratio = lacking_ratio
        quiet = threading.Event()  # set unless a KB write is being applied: writes go first (writer.py)
        quiet.set()
        self.scheduler = Scheduler(model, self.live.current, max_batch=max_batch, max_queue=max_queue,
                                   refuse_below=refuse_below, max_prompt_tokens=max_prompt_tokens,
                                   prune_config=PruneConfig(top_k=top_k, route=route), top_citations=top_citations,
                                   quiet=quiet, lacking_ratio=lacking_ratio)
        self.writer = KBWriter(self.live.current, self.live.publish, max_queue=max_queue, quiet=quiet)
        self.facts_lock = threading.Lock()
        self.facts_cache: tuple[tuple[str, int], pa.Table] | None = None  # (KB path, version) -> its facts

    def warm_up(self) -> float:
        """Run once what the first requests would run cold (an answer of two tokens over the KB, the
        encoder's exact passes of a write, the KB's hash column), so they are not the slowest of a run: under
        20 clients the first writes took 1.3-2.1 s against 0.2-0.8 s later (benchmarks/load_server.py
        "writes"). Changes nothing stored. Returns the seconds it took."""
        from atlaskv.kb.encoder import load_encoder
        from atlaskv.model.batching import BatchDecoder, Request

        t0 = time.perf_counter()
        kb = self.live.current()
        BatchDecoder(self.model).start_many([Request("What is the capital of Canada?", kb, max_new_tokens=2)])
        encoder = load_encoder(kb.encoder_name)
        if hasattr(encoder, "encode_exact"):
            encoder.encode_exact(["the capital of Canada", "Ottawa"], reuse=False, shape=kb.exact_pass)
        kb.live_hashes()
        return time.perf_counter() - t0

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
        """Answer (blocking until done): ServiceError queue_full when too many wait."""
        return self.reply(self.submit(job))

    async def answer_async(self, job: ChatJob) -> Reply:
        """answer() for an asyncio caller: waiting takes no thread."""
        return await self.reply_when_done(self.submit(job))

    def stream(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> StreamRun:
        """Submit a streamed answer whose pieces `loop` reads; a full queue raises here, before any byte
        goes out."""
        pieces = TextPieces(self.model.tokenizer, loop)
        return StreamRun(pieces, self.submit(job, pieces.streamer), self)

    def submit(self, job: ChatJob, streamer=None) -> Ticket:
        try:
            return self.scheduler.submit(job.messages, job.gen, streamer)
        except QueueFull:
            raise ServiceError("queue_full", "server busy: too many queued requests, retry later") from None

    async def reply_when_done(self, ticket: Ticket) -> Reply:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def wake():
            if not done.done():  # a client that left cancelled it
                done.set_result(None)

        ticket.on_done(lambda: loop.call_soon_threadsafe(wake))
        await done
        return self.reply(ticket)

    def reply(self, ticket: Ticket) -> Reply:
        """The Reply of a submitted request, once answered."""
        try:
            ticket.wait()
        except PromptTooLong as e:
            raise ServiceError("invalid", str(e), "prompt_too_long") from None
        seq = ticket.seq
        return Reply(seq.answer, seq.prompt_len, ticket.completion_tokens, ticket.kb.version, seq.max_new_tokens)

    # ------------------------------------------------------------ the KB
    def add(self, triples: list[tuple[str, str, str]]) -> KBChange:
        """Add triples live (blocking until committed and published; never waits for an answer: the writer
        thread, writer.py)."""
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
        try:
            job = self.writer.submit(op, triples)
        except WriteQueueFull:
            raise ServiceError("queue_full", "server busy: too many queued KB writes, retry later") from None
        except KBError as e:
            raise ServiceError("invalid", f"invalid request: {e}", "invalid_request") from None
        try:
            job.wait()
        except KBError as e:  # e.g. another process is writing the KB right now
            raise ServiceError("kb_busy", str(e), "kb_busy") from None
        return KBChange(job.result, job.live_triples)

    def kb_status(self) -> tuple[int, int]:
        """(version, live triples) of the KB as last read; does not wait for the model."""
        kb = self.live.kb
        return kb.version, len(kb)

    # ------------------------------------------------------------ reading the KB (the web page's KB panel)
    def overview(self) -> dict:
        """Size, version, encoder and relations (with their fact counts) of the KB: it shows every update
        acknowledged before it."""
        def go() -> dict:
            kb = self.live.current()
            counts = pc.value_counts(self.facts(kb).column("relation")).to_pylist()
            relations = sorted(({"relation": c["values"], "count": c["counts"]} for c in counts),
                               key=lambda r: (-r["count"], r["relation"]))
            info = kb.info()
            return {"model": self.name, "version": kb.version, "triples": len(kb), "entries": info["entries"],
                    "encoder": kb.encoder_name, "dim": kb.dim, "directions": info["directions"],
                    "indexed": info["index"] is not None, "refuse_below": self.refuse_below,
                    "lacking_ratio": self.lacking_ratio,
                    "relations": relations}

        return go()

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

        return go()

    def facts(self, kb: KnowledgeBase) -> pa.Table:
        """The KB's live triples (head, relation, tail), each once, sorted; kept until the KB changes."""
        key = (str(kb.path), kb.version)
        with self.facts_lock:
            if self.facts_cache is None or self.facts_cache[0] != key:
                t = kb.records().select(FACT_COLUMNS).group_by(FACT_COLUMNS).aggregate([])
                self.facts_cache = key, t.sort_by([(c, "ascending") for c in FACT_COLUMNS])
            return self.facts_cache[1]
