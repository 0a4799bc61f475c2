"""Reward functions: the protocol, a registry, built-ins, and robust batched evaluation.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float]`` (one score per
completion; ``columns`` holds the data set's other columns, e.g. ``answer``, repeated per completion). Calls run
with a timeout; a function that raises or times out scores 0 for that batch and is counted in the metrics, and
a function returning the wrong number of scores is an error naming it.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["REWARDS", "register_reward", "get_reward", "compute_rewards", "MathVerifier"]

RewardFn = Callable[..., Sequence[float]]
REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Register a reward *factory* ``factory(**kwargs) -> reward fn`` under ``name`` (config: reward.fns)."""

    def deco(factory):
        REWARDS[name] = factory
        return factory

    return deco


def get_reward(name: str, **kwargs) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"reward.fns: unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**kwargs)


@register_reward("task")
def _task_reward(marker: str = "#"):
    """Exact integer answer after ``marker`` (the arithmetic task's verifier)."""
    pattern = re.compile(re.escape(marker) + r"\s*(-?\d+)")

    def fn(prompts, completions, answer=None, **_):
        out = []
        for completion, gold in zip(completions, answer):
            m = pattern.search(completion)
            out.append(float(m is not None and gold is not None and int(m.group(1)) == int(gold)))
        return out

    return fn


@register_reward("format")
def _format_reward(pattern: str = r"#\s*-?\d+\s*$"):
    """1.0 when the completion matches ``pattern`` (default: it ends with a final-answer marker and a number)."""
    regex = re.compile(pattern, re.DOTALL)

    def fn(prompts, completions, **_):
        return [float(regex.search(c) is not None) for c in completions]

    return fn


def _verify_one(gold: str, completion: str) -> float:
    from math_verify import parse, verify

    return float(verify(parse(gold), parse(completion)))


class MathVerifier:
    """math-verify in a pool of worker processes with a timeout per item.

    A worker stuck on one item cannot be interrupted; when an item times out the whole pool is terminated and
    rebuilt, so one pathological answer costs at most ``item_timeout`` seconds.
    """

    def __init__(self, workers: int = 2, item_timeout: float = 5.0):
        self.workers = workers
        self.item_timeout = item_timeout
        self.timeouts = 0
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.workers)
        return self._pool

    def __call__(self, prompts, completions, answer=None, **_):
        pool = self._get_pool()
        jobs = [pool.apply_async(_verify_one, (str(g), str(c))) for g, c in zip(answer, completions)]
        out, broken = [], False
        for job in jobs:
            try:
                out.append(job.get(timeout=self.item_timeout) if not broken else 0.0)
            except mp.TimeoutError:
                self.timeouts += 1
                broken = True
                out.append(0.0)
            except Exception:  # a parse failure scores 0
                out.append(0.0)
        if broken:  # finish the batch without the stuck pool, then rebuild it
            self.close()
        return out

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


@register_reward("math_verify")
def _math_verify_reward(workers: int = 2, item_timeout: float = 5.0):
    return MathVerifier(workers=workers, item_timeout=item_timeout)


_EXECUTOR = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")


def compute_rewards(fns: Sequence[tuple[str, RewardFn, float]], prompts: Sequence[str], completions: Sequence[str],
                    columns: dict[str, Sequence], *, timeout: float = 10.0):
    """Weighted sum of reward functions ``[(name, fn, weight), ...]``.

    Returns ``(rewards float32 [N], per_fn {name: [N]}, stats {"reward_errors": e, "reward_timeouts": t})``.
    A timed-out call's thread cannot be killed; it is abandoned and its result ignored.
    """
    n = len(completions)
    total = np.zeros(n, np.float32)
    per_fn, errors, timeouts = {}, 0, 0
    for name, fn, weight in fns:
        future = _EXECUTOR.submit(fn, list(prompts), list(completions), **columns)
        try:
            scores = future.result(timeout=timeout)
        except cf.TimeoutError:
            timeouts += 1
            scores = [0.0] * n
        except Exception:
            errors += 1
            scores = [0.0] * n
        if scores is None or len(scores) != n:
            raise ValueError(f"reward function {name!r} returned {None if scores is None else len(scores)} "
                             f"scores for {n} completions")
        arr = np.asarray(scores, np.float32)
        per_fn[name] = arr
        total += weight * arr
    return total, per_fn, {"reward_errors": float(errors), "reward_timeouts": float(timeouts)}
