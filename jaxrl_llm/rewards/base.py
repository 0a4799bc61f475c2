"""The reward-function protocol, the registry, and robust batched evaluation.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float]`` with one score per
completion; ``columns`` are the data set's other columns (``answer``, ...) repeated per completion. A function
that declares no ``**kwargs`` receives only the columns it names. :func:`compute_rewards` runs every function
with a deadline, scores a function that raises or times out as 0 for the batch (counted in the returned
statistics), and rejects a function that returns the wrong number of scores, naming it.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["RewardFn", "REWARDS", "register_reward", "get_reward", "build_rewards", "compute_rewards",
           "STAT_KEYS"]

log = logging.getLogger("jaxrl_llm.rewards")

# Every call of compute_rewards returns all of these, so statistics of several calls can be summed key by key.
STAT_KEYS = ("reward_errors", "reward_timeouts", "reward_item_errors", "reward_item_timeouts")


@runtime_checkable
class RewardFn(Protocol):
    """``fn(prompts, completions, **columns) -> Sequence[float]`` (synchronous, one score per completion).

    Optionally ``fn.pop_stats() -> {"errors": int, "timeouts": int}`` reports items the function itself gave up
    on since the previous call (e.g. a verifier that times out single answers); they are added to the metrics.
    """

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
                 ) -> Sequence[float]: ...


REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str, *, factory: bool = True):
    """Decorator registering a reward under ``name`` (the ``reward.fns[].name`` of the config).

    With ``factory=True`` (default) the decorated callable is a factory ``factory(**kwargs) -> reward fn`` and the
    config's ``kwargs`` go to it; with ``factory=False`` it is the reward function itself and the ``kwargs`` are
    bound to every call. Registering a name again replaces the earlier entry.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def deco(obj):
        REWARDS[name] = obj if factory else (lambda **kwargs: functools.partial(obj, **kwargs) if kwargs else obj)
        return obj

    return deco


def get_reward(name: str, **kwargs) -> RewardFn:
    """Build a reward function: a registered ``name``, or ``package.module:function`` (a reward function whose
    keyword arguments are ``kwargs``)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward.fns: cannot import reward {name!r}: {err}") from None
        if not callable(fn):
            raise ValueError(f"reward.fns: {name!r} is not callable")
        return functools.partial(fn, **kwargs) if kwargs else fn
    if name not in REWARDS:
        import difflib

        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"reward.fns: unknown reward {name!r}{hint}; available: {', '.join(sorted(REWARDS))}, "
                         "or package.module:function")
    try:
        return REWARDS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"reward.fns: bad kwargs for reward {name!r}: {err}") from None


def build_rewards(specs) -> list[tuple[str, RewardFn, float]]:
    """``[(name, fn, weight), ...]`` from config ``reward.fns`` entries (objects with name/weight/kwargs)."""
    return [(s.name, get_reward(s.name, **dict(s.kwargs)), float(s.weight)) for s in specs]


def _columns_for(fn, columns: Mapping[str, Sequence]) -> dict[str, list]:
    """The columns ``fn`` accepts: all of them with ``**kwargs``, otherwise only the named parameters."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {k: list(v) for k, v in columns.items()}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {k: list(v) for k, v in columns.items()}
    names = {p.name for p in params}
    return {k: list(v) for k, v in columns.items() if k in names}


class _Call:
    """One reward call on a daemon thread. A daemon thread, unlike a ThreadPoolExecutor worker, does not hold
    up interpreter exit when a reward function hangs forever; it cannot be killed, only abandoned."""

    def __init__(self, fn, args, kwargs):
        self.result = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True,
                                        name="reward-call")
        self._thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as err:  # reported to the caller, never raised on this thread
            self.error = err
        finally:
            self.done.set()


_warned: dict[str, int] = {}


def _warn(name: str, what: str, err: BaseException | None = None) -> None:
    count = _warned.get(name, 0)
    _warned[name] = count + 1
    if count < 3:  # the first few are logged in full; the metrics keep counting
        log.warning("reward %r %s%s", name, what, f": {err!r}" if err is not None else "",
                    exc_info=err if count == 0 and err is not None else None)


def compute_rewards(fns: Sequence[tuple[str, Callable, float]], prompts: Sequence[str],
                    completions: Sequence[str], columns: Mapping[str, Sequence] | None = None, *,
                    timeout: float | None = 10.0):
    """Weighted sum of reward functions ``[(name, fn, weight), ...]`` on ``N`` completions.

    ``r_i = sum_f w_f * s_f(i)``. All functions run concurrently and share one deadline ``timeout`` seconds
    after the call starts (``None``: no deadline). A function that raises or misses the deadline scores 0 on
    the whole batch; its thread cannot be killed and is abandoned (its late result is ignored).

    Returns ``(rewards float32 [N], per_fn {name: float32 [N]}, stats)`` where ``stats`` holds
    ``reward_errors`` / ``reward_timeouts`` (calls that raised / timed out) and ``reward_item_errors`` /
    ``reward_item_timeouts`` (single scores zeroed: non-finite values, and items a function reported via
    ``pop_stats``).

    Raises ``ValueError`` naming the function when it returns a number of scores other than ``N`` or values
    that are not numbers, and naming the column when a column's length is not ``N``.
    """
    columns = dict(columns or {})
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"prompts has {len(prompts)} entries but completions has {n}")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} entries for {n} completions")
    names = [name for name, _, _ in fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    for name, fn, weight in fns:
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        if not math.isfinite(float(weight)):
            raise ValueError(f"reward {name!r} has a non-finite weight {weight}")

    prompts, completions = list(prompts), list(completions)
    calls = [_Call(fn, (prompts, completions), _columns_for(fn, columns)) for _, fn, _ in fns]
    deadline = None if timeout is None else time.monotonic() + timeout

    total = np.zeros(n, np.float64)
    per_fn: dict[str, np.ndarray] = {}
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    for (name, fn, weight), call in zip(fns, calls):
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not call.done.wait(left):
            stats["reward_timeouts"] += 1
            _warn(name, f"timed out after {timeout} s; scored 0")
            scores = np.zeros(n)
        elif call.error is not None:
            stats["reward_errors"] += 1
            _warn(name, "raised; scored 0", call.error)
            scores = np.zeros(n)
        else:
            scores = _as_scores(name, call.result, n)
            bad = ~np.isfinite(scores)
            if bad.any():
                stats["reward_item_errors"] += float(bad.sum())
                _warn(name, f"returned {int(bad.sum())} non-finite score(s); scored 0")
                scores = np.where(bad, 0.0, scores)
        pop = getattr(fn, "pop_stats", None)
        if callable(pop) and call.done.is_set():
            item = pop()
            stats["reward_item_errors"] += float(item.get("errors", 0))
            stats["reward_item_timeouts"] += float(item.get("timeouts", 0))
        per_fn[name] = scores.astype(np.float32)
        total += float(weight) * scores
    return total.astype(np.float32), per_fn, stats


def _as_scores(name: str, result, n: int) -> np.ndarray:
    if result is None or isinstance(result, (str, bytes)) or not hasattr(result, "__len__"):
        raise ValueError(f"reward function {name!r} must return a sequence of {n} floats, got "
                         f"{type(result).__name__}")
    if len(result) != n:
        raise ValueError(f"reward function {name!r} returned {len(result)} scores for {n} completions")
    try:
        scores = np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward function {name!r} returned scores that are not numbers: {err}") from None
    if scores.shape != (n,):
        raise ValueError(f"reward function {name!r} returned scores of shape {scores.shape}, expected ({n},)")
    return scores
