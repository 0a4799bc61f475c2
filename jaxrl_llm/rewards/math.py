"""Math answer verification with ``math-verify`` in a pool of worker processes, with a timeout per item.

SymPy can take unbounded time on pathological answers, so verification runs in separate processes
(:class:`TimedProcessPool`):

* inside a worker, math-verify's own alarm-based timeouts stop most slow parses/comparisons (they work there
  because each task runs on the worker's main thread);
* from outside, an item that has been *running* longer than ``item_timeout`` seconds (workers report when they
  start an item) is given up and counted as a timeout; since a process stuck in C code cannot be interrupted,
  the whole pool is killed and the items not yet finished are resubmitted to a fresh pool.

So one hung item costs about ``item_timeout`` seconds (plus a pool restart) and never blocks the batch.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import importlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence

from jaxrl_llm.hardware import cpu_cores

__all__ = ["MathVerifier", "TimedProcessPool", "verify_answer"]

_STARTED = None  # in a worker: queue on which it announces (tag, start time) of each item


def _worker_init(started, warm: tuple[str, ...]) -> None:
    global _STARTED
    _STARTED = started
    for module in warm:  # import before the first item's clock starts
        importlib.import_module(module)


def _run_item(tag, fn, args):
    if _STARTED is not None:
        _STARTED.put((tag, os.getpid(), time.monotonic()))  # CLOCK_MONOTONIC is system-wide on Linux
    return fn(*args)


class TimedProcessPool:
    """``map(fn, items)`` over worker processes where each item may run at most ``item_timeout`` seconds.

    ``fn`` must be picklable (a module-level function). Returns one ``(status, value)`` per item: ``("ok",
    result)``, ``("error", exception)`` or ``("timeout", None)``. Workers are started with ``spawn`` (the parent
    usually runs JAX threads, and forking a threaded process is unsafe) and reused across calls.
    """

    def __init__(self, workers: int | None = None, item_timeout: float = 5.0, warm: Sequence[str] = ()):
        workers = cpu_cores() if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not item_timeout > 0:
            raise ValueError(f"item_timeout must be > 0 seconds, got {item_timeout}")
        self.workers = workers
        self.item_timeout = float(item_timeout)
        self.warm = tuple(warm)
        self.restarts = 0  # pool restarts after hung or crashed workers
        self._pool: cf.ProcessPoolExecutor | None = None
        self._started = None
        self._round = 0

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("spawn")
            # SimpleQueue writes synchronously: a worker that dies right after announcing an item has announced it
            self._started = ctx.SimpleQueue()
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init,
                                                initargs=(self._started, self.warm))
        return self._pool

    def close(self) -> None:
        """Kill the worker processes (a later ``map`` starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public way to kill busy workers before Python 3.14
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            if p.is_alive():
                p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=5)
        if self._started is not None:
            self._started.close()
            self._started = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def map(self, fn: Callable, items: Sequence[tuple]) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = [("timeout", None)] * len(items)
        todo = list(range(len(items)))
        try:
            while todo:
                todo = self._round_of(fn, items, todo, out)
        except BaseException:
            self.close()  # never leave a busy pool behind (it would hold up interpreter exit)
            raise
        return out

    def _round_of(self, fn, items, todo, out) -> list[int]:
        """Run ``todo`` on the pool; returns the items to resubmit after a pool restart (else [])."""
        pool = self._get_pool()
        self._round += 1
        rnd = self._round
        futures = {pool.submit(_run_item, (rnd, i), fn, tuple(items[i])): i for i in todo}
        started: dict[int, tuple[int, float]] = {}  # item -> (worker pid, start time)
        pending = set(futures)
        poll = min(0.05, self.item_timeout / 4)
        procs = {}
        while pending:
            # the executor forgets its processes once broken: keep a view to find which one died
            procs.update(getattr(pool, "_processes", None) or {})
            done, pending = cf.wait(pending, timeout=poll, return_when=cf.FIRST_COMPLETED)
            self._drain(rnd, started)
            broken = False
            for fut in done:
                i = futures[fut]
                try:
                    out[i] = ("ok", fut.result())
                except cf.process.BrokenProcessPool:
                    broken = True
                    pending.add(fut)  # decided below with the other unfinished items
                except Exception as err:
                    out[i] = ("error", err)
            if broken:  # a worker died (crash, out of memory): the item it was running fails, others rerun
                self._drain(rnd, started)
                return self._restart(futures, pending, self._culprits(futures, pending, started, procs), out,
                                     "error")
            now = time.monotonic()
            stuck = [f for f in pending
                     if futures[f] in started and now - started[futures[f]][1] > self.item_timeout]
            if stuck:
                return self._restart(futures, pending, stuck, out, "timeout")
        return []

    @staticmethod
    def _culprits(futures, pending, started, procs) -> list:
        """The unfinished items that were running on a worker that died by itself. A worker runs its items one
        after another, so its latest started unfinished item is the one it was running. Workers the executor
        terminated after the crash exit with SIGTERM and are not blamed."""
        for p in procs.values():
            p.join(timeout=1)
        dead = {pid for pid, p in procs.items() if p.exitcode not in (None, -signal.SIGTERM)}
        latest: dict[int, tuple[float, object]] = {}
        for f in pending:
            if futures[f] in started:
                pid, t = started[futures[f]]
                if pid not in latest or t > latest[pid][0]:
                    latest[pid] = (t, f)
        blamed = [f for pid, (_, f) in latest.items() if pid in dead]
        return blamed or [f for _, f in latest.values()] or list(pending)

    def _drain(self, rnd: int, started: dict[int, tuple[int, float]]) -> None:
        while True:
            try:
                if self._started.empty():
                    return
                (r, i), pid, t = self._started.get()
            except (OSError, ValueError, EOFError):  # closed
                return
            if r == rnd:
                started[i] = (pid, t)

    def _restart(self, futures, pending, stuck, out, status: str) -> list[int]:
        for f in stuck:
            out[futures[f]] = (status, None)
        self.restarts += 1
        self.close()
        return sorted(futures[f] for f in pending if f not in stuck)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int):
    from math_verify import parse

    parsed = parse(gold, parsing_timeout=timeout)
    if not parsed and "$" not in gold and "\\boxed" not in gold:
        parsed = parse(f"${gold}$", parsing_timeout=timeout)  # bare LaTeX such as \frac{1}{2}
    return parsed


def verify_answer(gold: str, completion: str, timeout: int = 5) -> float:
    """1.0 when the final answer in ``completion`` is mathematically equal to ``gold`` (math-verify), else 0.0.

    ``timeout`` (whole seconds) bounds each parse/compare with math-verify's alarm, so call this on a main
    thread (e.g. in a worker process). Raises ``ValueError`` when ``gold`` itself cannot be parsed (a data
    problem, not a wrong answer).
    """
    from math_verify import parse, verify

    gold_parsed = _parse_gold(str(gold), timeout)
    if not gold_parsed:
        raise ValueError(f"cannot parse the reference answer {gold!r}")
    pred = parse(str(completion), parsing_timeout=timeout)
    if not pred:
        return 0.0
    return float(verify(gold_parsed, pred, timeout_seconds=timeout))


class MathVerifier:
    """Reward function ``fn(prompts, completions, answer=...) -> scores`` checking answers with math-verify.

    Args:
      workers: worker processes (default: the CPU cores this process may use, ``os.sched_getaffinity``).
      item_timeout: seconds an item may run before it scores 0 and its worker is killed.
      answer_key: the column holding the reference answers.

    Items that time out, or whose reference cannot be parsed, score 0; :meth:`pop_stats` reports their counts
    since the previous call. The pool starts lazily and is reused; :meth:`close` (or ``with``) stops it.
    """

    batched = True  # one call per batch: the pool parallelises the items and bounds each one's time itself

    def __init__(self, workers: int | None = None, item_timeout: float = 5.0, answer_key: str = "answer"):
        self.pool = TimedProcessPool(workers, item_timeout, warm=("math_verify",))
        self.answer_key = answer_key
        # math-verify's in-process alarms (whole seconds) stop ordinary slow cases well inside item_timeout
        self._inner_timeout = max(1, int(self.pool.item_timeout // 3))
        self._stats = {"errors": 0, "timeouts": 0}

    @property
    def item_timeout(self) -> float:
        return self.pool.item_timeout

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def pop_stats(self) -> dict[str, int]:
        out, self._stats = self._stats, {"errors": 0, "timeouts": 0}
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        golds = columns.get(self.answer_key)
        if golds is None:
            raise ValueError(f"math_verify needs the reference answers in column {self.answer_key!r}; "
                             f"columns: {sorted(columns)}")
        if len(golds) != len(completions):
            raise ValueError(f"{len(golds)} answers for {len(completions)} completions")
        items = [("" if g is None else str(g), str(c), self._inner_timeout) for g, c in zip(golds, completions)]
        scores = []
        for status, value in self.pool.map(verify_answer, items):
            if status != "ok":
                self._stats["errors" if status == "error" else "timeouts"] += 1
            scores.append(float(value) if status == "ok" else 0.0)
        return scores
