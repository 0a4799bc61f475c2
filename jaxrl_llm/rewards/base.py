"""The reward-function protocol, the registry, and robust batched evaluation.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float]`` with one score per
completion; ``columns`` are the data set's other columns (``answer``, ...) repeated per completion. A function
that declares no ``**kwargs`` receives only the columns it names. :func:`compute_rewards` calls every function
item by item with a time limit per item, scores an item that raises or times out as 0 (counted in the returned
statistics, the first traceback kept), and rejects a function that returns the wrong number of scores, naming
it.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxrl_llm.hardware import cpu_cores
from jaxrl_llm.rewards.calls import Call, run_calls

__all__ = ["RewardFn", "REWARDS", "register_reward", "get_reward", "build_rewards", "compute_rewards",
           "STAT_KEYS"]

log = logging.getLogger("jaxrl_llm.rewards")

# Every call of compute_rewards returns all of these, so statistics of several calls can be summed key by key.
STAT_KEYS = ("reward_errors", "reward_timeouts", "reward_item_errors", "reward_item_timeouts")


@runtime_checkable
class RewardFn(Protocol):
    """``fn(prompts, completions, **columns) -> Sequence[float]`` (synchronous, one score per completion).

    It is called with one item at a time, unless ``fn.batched`` is true: then it gets the whole batch and must
    bound the time of each item itself (a verifier with its own per-item timeouts, a batched reward model).
    Optionally ``fn.pop_stats() -> {"errors": int, "timeouts": int}`` reports items the function itself gave up
    on since the previous call (e.g. a verifier that times out single answers); they count as failed items.
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


_warned: dict[str, int] = {}


def _warn(name: str, what: str, err: BaseException | None = None) -> None:
    count = _warned.get(name, 0)
    _warned[name] = count + 1
    if count < 3:  # the first few are logged in full; the metrics keep counting
        log.warning("reward %r %s%s", name, what, f": {err!r}" if err is not None else "",
                    exc_info=err if count == 0 and err is not None else None)


def _calls_of(fn, prompts: list, completions: list, columns: dict, timeout: float | None) -> list[Call]:
    """One call per item, or one for the whole batch when ``fn.batched`` (a function that bounds the time of
    each item itself, like :class:`MathVerifier`; it gets ``timeout`` per item, summed, as a safety net)."""
    if getattr(fn, "batched", False):
        limit = None if timeout is None else timeout * max(len(completions), 1)
        return [Call(fn, (prompts, completions), columns, limit)]
    return [Call(fn, ([p], [c]), {k: [v[i]] for k, v in columns.items()}, timeout)
            for i, (p, c) in enumerate(zip(prompts, completions))]


def _scores_of(name: str, fn, calls: list[Call], n: int, timeout, stats: dict, first_errors: dict | None):
    """Scores ``[n]`` (0 for failed items) and the number of failed items, from ``fn``'s finished calls."""
    scores = np.zeros(n)
    failed = 0
    size = n if len(calls) == 1 and getattr(fn, "batched", False) else 1
    for i, call in enumerate(calls):
        part = slice(i * size, (i + 1) * size)
        if call.status == "ok":
            got = _as_scores(name, call.result, size)
            bad = ~np.isfinite(got)
            if bad.any():
                stats["reward_item_errors"] += float(bad.sum())
                failed += int(bad.sum())
                _warn(name, f"returned {int(bad.sum())} non-finite score(s); scored 0")
                if first_errors is not None:
                    first_errors.setdefault(name, f"returned a non-finite score for {_item(call)}")
            scores[part] = np.where(bad, 0.0, got)
            continue
        failed += size
        key = "reward_timeouts" if size > 1 else "reward_item_timeouts"
        if call.status == "error":
            key = "reward_errors" if size > 1 else "reward_item_errors"
            _warn(name, "raised; scored 0", call.error)
            text = "".join(traceback.format_exception(call.error))
        else:
            _warn(name, f"took more than {call.limit:g} s; scored 0")
            text = f"took more than {call.limit:g} s (reward.timeout={timeout:g} per item) on {_item(call)}\n"
        stats[key] += 1.0
        if first_errors is not None:
            first_errors.setdefault(name, text)
    pop = getattr(fn, "pop_stats", None)
    if callable(pop) and all(c.status == "ok" for c in calls):
        item = pop()
        stats["reward_item_errors"] += float(item.get("errors", 0))
        stats["reward_item_timeouts"] += float(item.get("timeouts", 0))
        failed += int(item.get("errors", 0)) + int(item.get("timeouts", 0))
    return scores, failed


def _item(call: Call) -> str:
    completions = call.args[1]
    return (f"completion {completions[0][:120]!r}" if len(completions) == 1
            else f"a batch of {len(completions)} completions")


def compute_rewards(fns: Sequence[tuple[str, Callable, float]], prompts: Sequence[str],
                    completions: Sequence[str], columns: Mapping[str, Sequence] | None = None, *,
                    timeout: float | None = 10.0, workers: int | None = None, first_errors: dict | None = None):
    """Weighted sum of reward functions ``[(name, fn, weight), ...]`` on ``N`` completions.

    ``r_i = sum_f w_f * s_f(i)``. Each function is called on one item at a time (``fn([prompt], [completion],
    **{column: [value]})``), on ``workers`` threads (default: the CPU cores available) shared by all functions,
    and each item may take ``timeout`` seconds from its own start (``None``: no limit). An item that raises,
    times out or scores a non-finite value scores 0 and is counted; the others keep their scores. A function
    with ``fn.batched = True`` is called once on the whole batch instead (it bounds each item's time itself).
    ``first_errors`` (a dict) receives the traceback of each function's first failure, by name.

    Returns ``(rewards float32 [N], per_fn {name: float32 [N]}, stats)``. ``stats`` holds ``reward_items``
    (``N``), ``reward_failed/<name>`` (items of that function that scored 0 because they failed),
    ``reward_item_errors`` / ``reward_item_timeouts`` (items that raised or scored non-finite / timed out, with
    those a batched function reports through ``pop_stats``) and ``reward_errors`` / ``reward_timeouts``
    (whole-batch calls of batched functions that raised / timed out).

    Raises ``ValueError`` naming the function when a call returns a number of scores other than its number of
    items or values that are not numbers, and naming the column when a column's length is not ``N``.
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
    calls = {name: _calls_of(fn, prompts, completions, _columns_for(fn, columns), timeout) for name, fn, _ in fns}
    run_calls([c for cs in calls.values() for c in cs], workers or cpu_cores())

    total = np.zeros(n, np.float64)
    per_fn: dict[str, np.ndarray] = {}
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    stats["reward_items"] = float(n)
    for name, fn, weight in fns:
        scores, failed = _scores_of(name, fn, calls[name], n, timeout, stats, first_errors)
        stats[f"reward_failed/{name}"] = float(failed)
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
