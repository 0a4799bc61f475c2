"""Reward functions: built-ins, math-verify with timeouts, error and timeout accounting, wrong lengths."""
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


def test_errors_and_timeouts_score_zero_and_are_counted():
    def ok(prompts, completions, **_):
        return [1.0] * len(completions)

    def boom(prompts, completions, **_):
        raise RuntimeError("bad")

    def slow(prompts, completions, **_):
        time.sleep(2.0)
        return [1.0] * len(completions)

    rewards, per_fn, stats = compute_rewards([("ok", ok, 0.5), ("boom", boom, 1.0), ("slow", slow, 1.0)],
                                             ["p", "q"], ["a", "b"], {"answer": ["1", "2"]}, timeout=0.3)
    np.testing.assert_allclose(rewards, [0.5, 0.5])
    assert stats == {"reward_errors": 1.0, "reward_timeouts": 1.0, "reward_item_errors": 0.0,
                     "reward_item_timeouts": 0.0}
    assert set(per_fn) == {"ok", "boom", "slow"}


def test_wrong_length_is_an_error():
    def short(prompts, completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 completions"):
        compute_rewards([("short", short, 1.0)], ["p", "q"], ["a", "b"], {}, timeout=5)


def test_overlong_shaping_values():
    np.testing.assert_allclose(overlong_penalty(np.array([16384, 18432, 20480, 20481]), max_len=20480,
                                                cache_len=4096), [0, -0.5, -1, -1])
