"""Reward functions: built-ins, math-verify with timeouts, per-item error and timeout accounting, the failing-reward
monitor, wrong lengths."""
import os
import time

import numpy as np
import pytest

from jaxrl_llm.advantages import overlong_penalty
from jaxrl_llm.rewards import MathVerifier, compute_rewards, get_reward


def test_task_and_format_rewards():
    task, fmt = get_reward("task"), get_reward("format")
    comps = ["b=1+2=3,#3", "b=1+2=3,#4", "no answer"]
    assert task(["p"] * 3, comps, answer=["3", "3", "3"]) == [1.0, 0.0, 0.0]
    assert fmt(["p"] * 3, comps) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")


def test_math_verify_equivalent_forms():
    verifier = MathVerifier(workers=1, item_timeout=30.0)
    try:
        gold = ["\\frac{1}{2}", "0.5", "$\\frac{1}{2}$", "3"]
        comps = ["The answer is $\\boxed{0.5}$", "$\\boxed{\\frac{1}{2}}$", "so $1/2$", "$\\boxed{4}$"]
        assert verifier(["q"] * 4, comps, answer=gold) == [1.0, 1.0, 1.0, 0.0]
    finally:
        verifier.close()


def test_errors_and_timeouts_score_zero_per_item_and_are_counted():
    def ok(prompts, completions, **_):
        return [1.0] * len(completions)

    def boom(prompts, completions, **_):
        raise RuntimeError("bad")

    def slow_on_b(prompts, completions, **_):  # one slow item must not zero the other
        if completions == ["b"]:
            time.sleep(2.0)
        return [1.0] * len(completions)

    first = {}
    start = time.monotonic()
    rewards, per_fn, stats = compute_rewards([("ok", ok, 0.5), ("boom", boom, 1.0), ("slow", slow_on_b, 1.0)],
                                             ["p", "q"], ["a", "b"], {"answer": ["1", "2"]}, timeout=0.3,
                                             workers=4, first_errors=first)
    assert time.monotonic() - start < 1.5  # the slow item was given up after its own 0.3 s
    np.testing.assert_allclose(rewards, [0.5 + 1.0, 0.5])
    np.testing.assert_allclose(per_fn["slow"], [1.0, 0.0])
    assert stats == {"reward_errors": 0.0, "reward_timeouts": 0.0, "reward_item_errors": 2.0,
                     "reward_item_timeouts": 1.0, "reward_items": 2.0, "reward_failed/ok": 0.0,
                     "reward_failed/boom": 2.0, "reward_failed/slow": 1.0}
    assert "Traceback" in first["boom"] and "RuntimeError: bad" in first["boom"]
    assert "more than 0.3 s" in first["slow"] and "'b'" in first["slow"] and "ok" not in first


def test_a_slow_batch_whose_items_are_each_in_time_keeps_every_score():
    def steady(prompts, completions, **_):  # 0.1 s an item: 1.2 s for the batch, each item well within 0.5 s
        time.sleep(0.1)
        return [1.0]

    rewards, _, stats = compute_rewards([("steady", steady, 1.0)], ["p"] * 12, ["c"] * 12, timeout=0.5, workers=1)
    np.testing.assert_allclose(rewards, np.ones(12))
    assert stats["reward_failed/steady"] == 0.0


def test_batched_functions_get_the_whole_batch():
    seen = []

    def whole(prompts, completions, **_):
        seen.append(len(completions))
        return [float(len(c)) for c in completions]

    whole.batched = True
    rewards, _, _ = compute_rewards([("whole", whole, 1.0)], ["p"] * 3, ["a", "bb", "ccc"], timeout=1.0)
    assert seen == [3]
    np.testing.assert_allclose(rewards, [1.0, 2.0, 3.0])


def test_reward_monitor_stops_only_above_the_failure_fraction_over_its_window():
    from jaxrl_llm.rewards.health import RewardMonitor

    monitor = RewardMonitor(["a", "b"], max_failure_frac=0.5, window=3)
    monitor.first_errors["b"] = "Traceback: boom"
    assert monitor.inspect(1, {"reward_items": 10.0, "reward_failed/a": 5.0, "reward_failed/b": 0.0}) is None
    assert monitor.inspect(2, {"reward_items": 10.0, "reward_failed/a": 0.0, "reward_failed/b": 6.0}) is None  # 6/20
    assert monitor.inspect(3, {"reward_items": 10.0, "reward_failed/a": 0.0, "reward_failed/b": 6.0}) is None  # 12/30
    stop = monitor.inspect(4, {"reward_items": 10.0, "reward_failed/a": 0.0, "reward_failed/b": 6.0})  # 18/30
    assert "'b' failed on 18 of 30 items over the last 3 step(s)" in str(stop) and "boom" in stop.details
    first_step = RewardMonitor(["a"], max_failure_frac=0.5, window=3)
    assert first_step.inspect(1, {"reward_items": 8.0, "reward_failed/a": 8.0}) is not None


def test_worker_pools_default_to_the_cores_this_process_may_use(monkeypatch):
    from jaxrl_llm.hardware import cpu_cores
    from jaxrl_llm.rewards.math import TimedProcessPool

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert cpu_cores() == 3 and TimedProcessPool().workers == 3


def test_wrong_length_is_an_error():
    def short(prompts, completions, **_):
        return [1.0]

    def empty(prompts, completions, **_):
        return []

    with pytest.raises(ValueError, match="'empty' returned 0 scores for 1 completions"):
        compute_rewards([("empty", empty, 1.0)], ["p", "q"], ["a", "b"], {}, timeout=5)
    short.batched = True
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 completions"):
        compute_rewards([("short", short, 1.0)], ["p", "q"], ["a", "b"], {}, timeout=5)


def test_overlong_shaping_values():
    np.testing.assert_allclose(overlong_penalty(np.array([16384, 18432, 20480, 20481]), max_len=20480,
                                                cache_len=4096), [0, -0.5, -1, -1])
