"""Which threads of the server may keep torch's CPU worker pool.

torch runs its CPU ops on OpenMP (libgomp), which keeps a pool of worker threads for every thread that ran a
parallel op, for as long as that thread lives. Once the pools hold more threads than the machine has cores,
libgomp stops spinning between parallel regions and wakes its workers through the kernel instead, so every
op of the model thread pays for a wake-up: an 8-answer prefill ran 1.4-1.6x slower in the scheduler's thread
once the main thread had loaded the model (benchmarks/openmp_threads.py). So only the scheduler's thread keeps
a pool; work that runs once or now and then (loading and warming up, a KB write's encoder pass) runs in a
thread of its own that ends with it, and its pool with it.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T], name: str = "atlaskv-passing") -> T:
    """fn() in a new thread that ends when it returns; its result, or its exception raised here."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
