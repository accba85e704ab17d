"""KB writes for the server, off the answer path: one writer thread applies queued adds and removes.

Writes that wait together are applied together (a group commit): a run of adds is encoded in one pass and
committed as one new version, and likewise a run of removes. Encoding dominates a small add (the encoder's
batch-exact pass costs about the same for 1 or 64 texts), so under load the writes keep up instead of
queueing behind each other. Each request still gets its own counts (added / duplicates, removed / not
found), and it is acknowledged only once its version is committed and published (service.LiveKB), so every
answer admitted after the acknowledgement reads it, and none reads half of it.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from atlaskv.kb.layout import triple_hash
from atlaskv.kb.store import KnowledgeBase, UpdateResult, clean_triples
from atlaskv.serve.threads import in_passing_thread

Op = Literal["add", "remove"]


class WriteQueueFull(Exception):
    pass


@dataclass
class WriteJob:
    op: Op
    triples: list                       # checked and deduplicated (clean_triples)
    duplicates: int                     # repeated within the request
    result: UpdateResult | None = None
    live_triples: int = 0               # triples in the KB after the commit
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> "WriteJob":
        self.event.wait()
        if self.error is not None:
            raise self.error
        return self


class KBWriter:
    """Applies writes to the KB that `current()` returns, then `publish(kb)`es the new version. At most
    `max_queue` writes wait (WriteQueueFull beyond); at most `max_group` are committed together."""

    def __init__(self, current: Callable[[], KnowledgeBase], publish: Callable[[KnowledgeBase], None], *,
                 max_queue: int, max_group: int = 256, quiet: threading.Event | None = None):
        self.current, self.publish = current, publish
        # cleared while a group is applied: the scheduler holds its next step, so that a write's encoder pass
        # runs alone on the cores instead of at half speed beside the decode (serve/scheduler.py)
        self.quiet = quiet
        self.max_queue, self.max_group = max_queue, max_group
        self.pending: deque[WriteJob] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def submit(self, op: Op, items) -> WriteJob:
        """Queue a write of (head, relation, tail) items; KBError for a bad item, before anything is queued."""
        triples, dup = clean_triples(items)
        job = WriteJob(op, triples, dup)
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise WriteQueueFull()
            self.pending.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="atlaskv-writer", daemon=True)
                self.thread.start()
            self.cond.notify()
        return job

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                op = self.pending[0].op
                run = []
                while self.pending and self.pending[0].op == op and len(run) < self.max_group:
                    run.append(self.pending.popleft())
            if self.quiet is not None:
                self.quiet.clear()
            try:  # in a thread of its own: only the model's thread keeps torch's worker pool (threads.py)
                in_passing_thread(lambda: self._apply(op, run), name="atlaskv-write")
            except BaseException as e:  # KBError (another process writes the KB), a full disk, ...
                for job in run:
                    job.error = e
            finally:
                if self.quiet is not None:
                    self.quiet.set()
            for job in run:
                job.event.set()

    def _apply(self, op: Op, run: list[WriteJob]) -> None:
        kb = KnowledgeBase.open(self.current().path)  # the writer's own: the published snapshot never changes
        asked = np.fromiter({triple_hash(t) for job in run for t in job.triples}, np.int64)
        stored = kb.live_hashes()
        live = set(stored[np.isin(stored, asked)].tolist())  # of the asked ones, those stored
        done: set[int] = set()  # added (or removed) by an earlier request of this run
        per_job = []
        for job in run:
            hit, miss = [], 0
            for t in job.triples:
                h = triple_hash(t)
                known = (h in live or h in done) if op == "add" else (h in live and h not in done)
                if (op == "add") != known:
                    hit.append(t)
                    done.add(h)
                else:
                    miss += 1
            per_job.append((hit, miss))
        todo = [t for hit, _ in per_job for t in hit]
        version = kb.version
        if todo:
            version = (kb.add(todo) if op == "add" else kb.remove(todo)).version
            self.publish(kb)
        for job, (hit, miss) in zip(run, per_job):
            job.result = (UpdateResult(added=len(hit), duplicates=miss + job.duplicates, version=version)
                          if op == "add" else UpdateResult(removed=len(hit), not_found=miss, version=version))
            job.live_triples = len(kb)
