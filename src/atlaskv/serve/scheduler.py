"""The serving loop: one thread owns the model and answers every chat request together (continuous batching).

    submit(job)  -> Ticket       a bounded queue (QueueFull beyond max_queue waiting)
    loop:  admit up to PREFILL_BATCH waiting requests while the batch has room, once the running answers have
           decoded as long as the last prefill took (at once when none runs): prefill them together over the KB
           snapshot of that moment (BatchDecoder.start_many; a refused answer ends there), then one decode step
           for the whole batch; an answer that ends leaves, its Ticket is set

Streamed requests get their text pieces as tokens are chosen (a transformers TextIteratorStreamer per
request). KB writes never come here: the writer thread applies them and publishes a new snapshot, which the
next admitted request reads (service.py, writer.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from atlaskv.defaults import LACKING_RATIO
from atlaskv.model.batching import BatchDecoder, Request, Running

log = logging.getLogger(__name__)


# requests prefilled in one forward: on a 2-core CPU a 30-token prompt costs 120 ms alone and 51 ms each in
# a batch of 8 (benchmarks/results/batching_steps.json)
PREFILL_BATCH = 8


def pause_between_layers(model, quiet: threading.Event, thread: threading.Thread) -> list:
    """Writes go first inside a forward pass too: on `thread`, every decoder layer waits while `quiet` is
    clear (a KB write is being applied), so a write never waits for a whole prefill (~1 s for 8 rows) and
    never shares the two cores with it; the pause changes nothing in the forward. Returns the hook handles."""
    from atlaskv.model.adapter import attention_modules

    def hold(module, args):
        if not quiet.is_set() and threading.current_thread() is thread:
            quiet.wait()

    return [m.register_forward_pre_hook(hold) for m in attention_modules(model)]


class QueueFull(Exception):
    pass


@dataclass
class Ticket:
    """One submitted chat request: set when its answer is done (or failed)."""
    messages: list[dict]
    gen: dict
    streamer: object = None            # TextIteratorStreamer of a streamed request
    kb: object = None                  # the KB snapshot it was answered over
    seq: Running | None = None         # its answer, once done
    completion_tokens: int = 0
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)

    callbacks: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self) -> "Ticket":
        self.event.wait()
        if self.error is not None:
            raise self.error
        return self

    def on_done(self, fn: Callable[[], None]) -> None:
        """Call `fn` (from the scheduler's thread) once the ticket is set; now if it already is."""
        with self.lock:
            if not self.event.is_set():
                self.callbacks.append(fn)
                return
        fn()

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        if self.streamer is not None:
            self.streamer.end()
        with self.lock:
            self.event.set()
            callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            fn()


class Scheduler:
    """Answers submitted chat requests over `snapshot()` (the live KB at admission) in batches of at most
    `max_batch`, with at most `max_queue` waiting. The thread starts with the first request."""

    def __init__(self, model, snapshot: Callable[[], object], *, max_batch: int, max_queue: int,
                 refuse_below: float, max_prompt_tokens: int, prune_config, top_citations: int,
                 quiet: threading.Event | None = None, lacking_ratio: float = LACKING_RATIO):
        self.model, self.snapshot = model, snapshot
        self.quiet = quiet  # when given: the model's layers run only while it is set (a KB write goes first)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.refuse_below, self.lacking_ratio, self.max_prompt_tokens = refuse_below, lacking_ratio, max_prompt_tokens
        self.prune_config, self.top_citations = prune_config, top_citations
        self.waiting: deque[Ticket] = deque()
        self.running: dict[int, Ticket] = {}   # id(seq) -> its ticket
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.decoder: BatchDecoder | None = None
        # seconds of decoding owed to the running answers since the last prefill: requests waiting while
        # answers decode are admitted once the answers have decoded as long as that prefill took. Admitting
        # at every turn made every token of a running answer wait for a prefill (0.6-0.7 s per token under
        # 20 clients, docs/results.md); an idle batch admits at once.
        self.decode_owed = 0.0

    def submit(self, messages: list[dict], gen: dict, streamer=None) -> Ticket:
        ticket = Ticket(messages, gen, streamer)
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            self.waiting.append(ticket)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="atlaskv-scheduler", daemon=True)
                self.thread.start()
            self.cond.notify()
        return ticket

    def load(self) -> tuple[int, int]:
        """(answers running, requests waiting)."""
        with self.cond:
            return len(self.running), len(self.waiting)

    # ------------------------------------------------------------ the loop (its own thread)
    def _loop(self) -> None:
        self.decoder = BatchDecoder(self.model, top_citations=self.top_citations, prune_config=self.prune_config)
        if self.quiet is not None:
            pause_between_layers(self.model.model, self.quiet, threading.current_thread())
        while True:
            with self.cond:
                while not self.waiting and not self.running:
                    self.cond.wait()
                admit = []
                if not self.decoder.rows or self.decode_owed <= 0:
                    while self.waiting and len(self.running) + len(admit) < self.max_batch and len(admit) < PREFILL_BATCH:
                        admit.append(self.waiting.popleft())
            if self.quiet is not None:
                self.quiet.wait()
            if admit:
                t0 = time.perf_counter()
                self._start(admit)
                self.decode_owed = time.perf_counter() - t0
            if self.quiet is not None:
                self.quiet.wait()
            if self.decoder.rows:
                t0 = time.perf_counter()
                try:
                    ended = self.decoder.step()
                except Exception as e:  # every answer of the batch is lost; the server goes on
                    log.exception("decode step failed")
                    self._fail_batch(e)
                    continue
                self.decode_owed -= time.perf_counter() - t0
                for seq in ended:
                    self._done(seq)

    def _start(self, tickets: list[Ticket]) -> None:
        """Prefill the admitted requests together over the KB snapshot of this moment."""
        import torch

        try:
            kb = self.snapshot()
        except Exception as e:  # the KB cannot be read right now (its folder gone, a broken manifest)
            log.exception("reading the KB failed")
            for t in tickets:
                t.set(e)
            return
        requests = []
        for t in tickets:
            t.kb = kb
            on_token = None
            if t.streamer is not None:
                on_token = (lambda streamer: lambda tok: streamer.put(torch.tensor([tok])))(t.streamer)
            g = t.gen
            requests.append(Request(t.messages, kb, max_new_tokens=g["max_new_tokens"],
                                    do_sample=g.get("do_sample", False), temperature=g.get("temperature", 1.0),
                                    top_p=g.get("top_p", 1.0), refuse_below=self.refuse_below,
                                    lacking_ratio=self.lacking_ratio, on_token=on_token,
                                    max_prompt_tokens=self.max_prompt_tokens))
        try:
            started = self.decoder.start_many(requests)
        except Exception as e:  # the prefill itself failed: these requests only
            log.exception("prefill failed")
            started = [e] * len(tickets)
        for t, seq in zip(tickets, started):
            if isinstance(seq, BaseException):
                t.set(seq)
                continue
            with self.cond:
                self.running[id(seq)] = t
            if seq.done:
                self._done(seq)
                continue
            try:
                self.decoder.join(seq)
            except Exception as e:  # this answer only: the batch is as it was
                log.exception("joining the batch failed")
                with self.cond:
                    self.running.pop(id(seq), None)
                t.set(e)

    def _done(self, seq: Running) -> None:
        with self.cond:
            ticket = self.running.pop(id(seq))
        ticket.seq = seq
        try:
            ticket.completion_tokens = len(self.model.tokenizer(seq.answer.text, add_special_tokens=False)["input_ids"])
        except Exception:  # a count is not worth a lost answer
            log.exception("counting the answer's tokens failed")
            ticket.completion_tokens = len(seq.generated)
        ticket.set()

    def _fail_batch(self, error: BaseException) -> None:
        for seq in self.decoder.rows:
            with self.cond:
                ticket = self.running.pop(id(seq), None)
            if ticket is not None:
                ticket.set(error)
        self.decoder = BatchDecoder(self.model, top_citations=self.top_citations, prune_config=self.prune_config)
