"""Advantage estimators and reward shaping (pure functions over arrays).

Group-shaped functions take rewards ``[num_groups, group_size]`` (the ``group_size`` responses sampled for one
prompt form a group); token-shaped ones take ``[batch, time]`` with a response ``mask``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.losses._checks import check_2d

__all__ = [
    "gae", "grpo", "rloo", "whiten", "reinforce_pp", "reinforce_pp_baseline", "passk", "broadcast_over_tokens",
    "overlong_penalty", "informative_groups", "differential_smoothing", "sequence_logprob",
    "Estimator", "ESTIMATORS", "register_advantage", "get_advantage",
]


def _check_groups(rewards) -> None:
    if getattr(rewards, "ndim", None) != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {getattr(rewards, 'shape', None)}")


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0, lam: float = 1.0):
    """Generalised advantage estimation over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the value and
    advantage after the last valid token are 0 (the episode ends). Computed by a reverse ``lax.scan``.
    Returns ``(advantages, returns)`` with ``returns = A + V`` (the critic's target), both 0 on masked tokens.
    """
    check_2d(rewards=rewards, values=values, mask=mask)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * m
    v = values.astype(jnp.float32) * m

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = (delta + gamma * lam * next_adv) * m_t
        # a masked step passes the carry through, so padding between tokens is skipped
        carry = (jnp.where(m_t > 0, v_t, next_value), jnp.where(m_t > 0, adv, next_adv))
        return carry, adv

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * m


def grpo(rewards: jax.Array, *, eps: float = 1e-6, scale_by_std: bool = True) -> jax.Array:
    """Group-relative advantage ``(r - mean_group) / (std_group + eps)``.

    The std is the unbiased (Bessel-corrected) one, as in the reference implementations. ``scale_by_std=False``
    is Dr. GRPO (``r - mean`` only). A group of one response has no baseline: its mean is taken as 0 and its
    std as 1, so its advantage is its reward (the reference implementations' convention).
    """
    _check_groups(rewards)
    r = rewards.astype(jnp.float32)
    n = r.shape[1]
    if n == 1:
        mean, std = jnp.zeros_like(r), jnp.ones_like(r)
    else:
        mean = r.mean(axis=1, keepdims=True)
        std = jnp.std(r, axis=1, ddof=1, keepdims=True)
    centred = r - mean
    return centred / (std + eps) if scale_by_std else centred


def rloo(rewards: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out: ``r_i - mean_{j != i} r_j`` (= ``n / (n - 1) * (r_i - mean)``)."""
    _check_groups(rewards)
    r = rewards.astype(jnp.float32)
    n = r.shape[1]
    if n < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {n}")
    return (r - r.mean(axis=1, keepdims=True)) * (n / (n - 1))


def _whiten(x, mask, eps):
    m = mask.astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    mean = jnp.sum(x * m) / count
    var = jnp.sum(jnp.square(x - mean) * m) / count
    return (x - mean) * jax.lax.rsqrt(var + eps) * m


def whiten(x: jax.Array, mask: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """``(x - mean) / std`` over the valid tokens of the whole batch (0 elsewhere), as PPO does to GAE advantages."""
    check_2d(x=x, mask=mask)
    return _whiten(x.astype(jnp.float32), mask, eps)


def reinforce_pp(token_rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0, eps: float = 1e-8) -> jax.Array:
    """REINFORCE++: discounted return-to-go of per-token rewards, whitened over every valid token of the batch.

    ``token_rewards`` typically holds the outcome reward on the last response token and ``-beta * KL`` on every
    token. Returns advantages ``[batch, time]``.
    """
    check_2d(token_rewards=token_rewards, mask=mask)
    m = mask.astype(jnp.float32)

    def step(carry, xs):
        r_t, m_t = xs
        g = r_t * m_t + gamma * carry * m_t + carry * (1.0 - m_t)
        return g, g * m_t

    _, returns = jax.lax.scan(step, jnp.zeros(m.shape[0], jnp.float32),
                              ((token_rewards.astype(jnp.float32) * m).T, m.T), reverse=True)
    return _whiten(returns.T, mask, eps)


def reinforce_pp_baseline(rewards: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """REINFORCE++ with a group baseline: subtract each group's mean, then whiten over the whole batch."""
    _check_groups(rewards)
    r = rewards.astype(jnp.float32)
    centred = r - r.mean(axis=1, keepdims=True)
    return _whiten(centred, jnp.ones_like(centred, bool), eps)


def _comb(n, k):
    return math.comb(n, k) if 0 <= k <= n else 0


def passk(rewards: jax.Array, *, k: int) -> jax.Array:
    """Group advantages that optimise pass@k instead of pass@1 (analytic form of "Pass@k Training").

    With binary rewards, ``n`` responses of which ``n_neg`` are wrong, the group's expected pass@k over uniformly
    drawn k-subsets is ``R = 1 - C(n_neg, k) / C(n, k)`` and its std ``s = sqrt(R (1 - R))``. A response's
    advantage is the mean normalised advantage ``(max reward of subset - R) / s`` over the k-subsets that contain
    it:

    * correct response: ``(1 - R) / s``
    * wrong response: ``(1 - R - C(n_neg - 1, k - 1) / C(n - 1, k - 1)) / s``

    Groups with ``s = 0`` (every k-subset solves it, or none does) get 0. Rewards > 0 count as correct.
    """
    _check_groups(rewards)
    n = rewards.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, group_size={n}], got {k}")
    correct = rewards > 0
    n_neg = (~correct).sum(axis=1)
    # tables over n_neg = 0..n of the combinatorial ratios (static n and k, exact in Python integers)
    fail_all = np.array([_comb(j, k) / _comb(n, k) for j in range(n + 1)], np.float64)
    fail_with = np.array([_comb(j - 1, k - 1) / _comb(n - 1, k - 1) if j >= 1 and n > 1 else float(j >= 1)
                          for j in range(n + 1)], np.float64)
    big_r = 1.0 - jnp.asarray(fail_all, jnp.float32)[n_neg]
    std = jnp.sqrt(jnp.maximum(big_r * (1.0 - big_r), 0.0))
    pos = (1.0 - big_r) / jnp.where(std > 0, std, 1.0)
    neg = (1.0 - big_r - jnp.asarray(fail_with, jnp.float32)[n_neg]) / jnp.where(std > 0, std, 1.0)
    adv = jnp.where(correct, pos[:, None], neg[:, None])
    return jnp.where((std > 0)[:, None], adv, 0.0)


def broadcast_over_tokens(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Place a per-response scalar (outcome reward or advantage) ``[batch]`` on every valid token ``[batch, time]``."""
    check_2d(mask=mask)
    if values.shape != mask.shape[:1]:
        raise ValueError(f"values must have shape ({mask.shape[0]},) to match mask {mask.shape}, got {values.shape}")
    return jnp.where(mask, values.astype(jnp.float32)[:, None], 0.0)


def overlong_penalty(lengths, *, max_len: int, cache_len: int):
    """DAPO soft overlong punishment, in tokens: 0 up to ``max_len - cache_len``, then linear down to -1 at
    ``max_len``, and -1 beyond. Works on numpy or jax arrays."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    xp = jnp if isinstance(lengths, jax.Array) else np
    lengths = xp.asarray(lengths, dtype=xp.float32)
    return xp.clip(((max_len - cache_len) - lengths) / cache_len, -1.0, 0.0)


def informative_groups(rewards):
    """Mask ``[num_groups]`` of groups whose rewards are not all equal (DAPO dynamic sampling keeps these)."""
    _check_groups(rewards)
    xp = jnp if isinstance(rewards, jax.Array) else np
    return xp.max(rewards, axis=1) != xp.min(rewards, axis=1)


def sequence_logprob(logp: jax.Array, mask: jax.Array, *, length_norm: bool = False) -> jax.Array:
    """``log pi(y|x) = sum_t logp_t`` per response ``[batch]`` (the per-token mean with ``length_norm``)."""
    check_2d(logp=logp, mask=mask)
    total = jnp.sum(jnp.where(mask, logp.astype(jnp.float32), 0.0), axis=-1)
    return total / jnp.maximum(mask.sum(axis=-1), 1) if length_norm else total


def differential_smoothing(advantages: jax.Array, seq_logp: jax.Array, correct: jax.Array, *,
                           gamma_pos: float, gamma_neg: float) -> jax.Array:
    """Differential Smoothing (arXiv 2511.19942, Eq. 6) on sequence advantages ``[batch]``:
    ``A - gamma_pos * log pi_old(y|x)`` for correct samples (a bonus that favours rarer correct solutions) and
    ``A + gamma_neg * log pi_old(y|x)`` for incorrect ones (a penalty that pushes hardest on likely errors)."""
    if gamma_pos < 0 or gamma_neg < 0:
        raise ValueError(f"gamma_pos and gamma_neg must be >= 0, got {gamma_pos}, {gamma_neg}")
    if not advantages.shape == seq_logp.shape == correct.shape or advantages.ndim != 1:
        raise ValueError(f"advantages, seq_logp and correct must share one [batch] shape, got {advantages.shape}, "
                         f"{seq_logp.shape}, {correct.shape}")
    seq_logp = jax.lax.stop_gradient(seq_logp.astype(jnp.float32))
    return jnp.where(correct.astype(bool), advantages - gamma_pos * seq_logp, advantages + gamma_neg * seq_logp)


# ---------------------------------------------------------------------------------------------------------------
# registry: the estimators a run config names (``algorithm.advantage``)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An advantage estimator as the trainer calls it. ``kind`` says what it reads:

    * ``group``: ``fn(rewards [groups, n], algo) -> [groups, n]`` sequence advantages from the ``n`` samples of a
      prompt (broadcast over each response's tokens; Differential Smoothing applies to these);
    * ``token``: ``fn(token_rewards [N, R], mask, algo) -> [N, R]``;
    * ``critic``: ``fn(token_rewards, values [N, R], mask, algo) -> (advantages, returns)`` with a learned value.

    ``algo`` is the run's algorithm settings (``jaxrl_llm.config.AlgorithmSection``): knobs are read from it by name.
    """

    fn: Callable
    kind: str


ESTIMATORS: dict[str, Estimator] = {}
_KINDS = ("group", "token", "critic")


def register_advantage(name: str, kind: str):
    """Decorator registering an estimator under ``name`` (one function, one registration)."""
    if kind not in _KINDS:
        raise ValueError(f"estimator kind must be one of {_KINDS}, got {kind!r}")

    def deco(fn):
        ESTIMATORS[name] = Estimator(fn, kind)
        return fn

    return deco


def get_advantage(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; available: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]


register_advantage("grpo", "group")(lambda groups, algo: grpo(groups))
register_advantage("drgrpo", "group")(lambda groups, algo: grpo(groups, scale_by_std=False))
register_advantage("rloo", "group")(lambda groups, algo: rloo(groups))
register_advantage("reinforce_pp_baseline", "group")(lambda groups, algo: reinforce_pp_baseline(groups))
register_advantage("passk", "group")(lambda groups, algo: passk(groups, k=algo.passk_k))
register_advantage("reinforce_pp", "token")(
    lambda token_rewards, mask, algo: reinforce_pp(token_rewards, mask, gamma=algo.gamma))


@register_advantage("gae", "critic")
def _gae_whitened(token_rewards, values, mask, algo):
    """GAE with the advantages whitened over the batch (PPO); the returns are the critic's targets."""
    adv, returns = gae(token_rewards, values, mask, gamma=algo.gamma, lam=algo.lam)
    return whiten(adv, mask), returns
