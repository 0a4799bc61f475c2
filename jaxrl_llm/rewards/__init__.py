"""Rewards: the reward-function protocol, a registry, built-in verifiers and the overlong length shaping.

A reward function is ``fn(prompts, completions, **columns) -> list[float]``; see :mod:`jaxrl_llm.rewards.base`.
Built-ins (``reward.fns[].name``): ``task``, ``exact_int``, ``format``, ``math_verify``; any
``package.module:function`` works too.
"""
from jaxrl_llm.rewards.base import (REWARDS, STAT_KEYS, RewardFn, build_rewards, compute_rewards, get_reward,
                                    register_reward)
from jaxrl_llm.rewards.builtin import exact_int_reward, format_reward, overlong_penalty
from jaxrl_llm.rewards.math import MathVerifier, verify_answer

__all__ = ["REWARDS", "STAT_KEYS", "RewardFn", "register_reward", "get_reward", "build_rewards", "compute_rewards",
           "MathVerifier", "verify_answer", "exact_int_reward", "format_reward", "overlong_penalty"]
