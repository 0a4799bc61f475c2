"""Calls with a time limit each, on a few worker threads: :func:`run_calls`.

A call that runs longer than its limit is given up: it reports a timeout, and its thread, which Python cannot
stop, is abandoned (a daemon thread, so it never holds up interpreter exit; its late result is dropped) and
replaced, so the other calls keep ``workers`` threads. The limit of a call counts from the moment it starts, not
from the start of the batch, so a slow batch never zeroes calls that finished in time.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["Call", "run_calls"]


class Call:
    """``fn(*args, **kwargs)`` with at most ``limit`` seconds (None: no limit). After :func:`run_calls`,
    ``status`` is ``"ok"`` (``result`` holds the value), ``"error"`` (``error`` the exception) or ``"timeout"``."""

    __slots__ = ("fn", "args", "kwargs", "limit", "started", "status", "result", "error")

    def __init__(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, limit: float | None = None):
        self.fn, self.args, self.kwargs, self.limit = fn, args, kwargs or {}, limit
        self.started: float | None = None
        self.status: str | None = None
        self.result = None
        self.error: BaseException | None = None


def run_calls(calls: Sequence[Call], workers: int) -> None:
    """Run ``calls`` on up to ``workers`` threads, each within its limit; fills in their status."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for call in calls:
        todo.put(call)
    lock = threading.Lock()
    finished = threading.Semaphore(0)
    running: dict[int, Call] = {}  # id(call) -> call, while a worker runs it

    def work() -> None:
        while True:
            try:
                call = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                call.started = time.monotonic()
                running[id(call)] = call
            try:
                result, error = call.fn(*call.args, **call.kwargs), None
            except BaseException as err:  # reported through the call, never raised on this thread
                result, error = None, err
            with lock:
                if call.status == "timeout":  # given up meanwhile: this thread has been replaced
                    return
                running.pop(id(call), None)
                call.result, call.error, call.status = result, error, "ok" if error is None else "error"
            finished.release()

    def start() -> None:
        threading.Thread(target=work, daemon=True, name="reward-worker").start()

    for _ in range(max(1, min(int(workers), len(calls)))):
        start()
    limits = [c.limit for c in calls if c.limit is not None]
    poll = min([0.05] + [limit / 4 for limit in limits])
    left = len(calls)
    while left:
        if finished.acquire(timeout=poll):
            left -= 1
            continue
        now = time.monotonic()
        with lock:
            late = [c for c in running.values() if c.limit is not None and now - c.started > c.limit]
            for call in late:
                call.status = "timeout"
                del running[id(call)]
        for _ in late:
            left -= 1
            start()
