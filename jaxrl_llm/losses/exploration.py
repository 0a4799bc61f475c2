"""Remedies against entropy collapse that act on individual tokens of the policy-gradient loss.

* Clip-Cov / KL-Cov (arXiv 2505.22617): the entropy change of a softmax policy follows the covariance between a
  token's log-prob and its advantage, ``Cov_t = (logp_t - mean logp) (A_t - mean A)`` over the batch's tokens.
  A few tokens with a large covariance drive the collapse. Clip-Cov detaches a random fraction of the tokens whose
  covariance lies in a band; KL-Cov adds a penalty ``|logp - old_logp|`` on the top fraction by covariance.
* High-entropy-token training ("forking tokens"): only the top fraction of tokens by entropy get policy gradient.
* An entropy bonus whose coefficient is steered towards a target entropy (adaptive entropy control).

Selections are made over the valid tokens of the array they get (in the trainer: one micro-batch). They return
boolean masks; :func:`gate_gradient` turns a mask into a stop-gradient on the selected log-probs, so any policy
loss can be combined with them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.losses._checks import check_2d

__all__ = ["token_covariance", "top_fraction", "clip_cov_select", "kl_cov_select", "gate_gradient",
           "adaptive_entropy_coef"]


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(mask.sum(), 1)


def token_covariance(logp, advantages, mask):
    """Per-token ``(logp_t - mean logp)(A_t - mean A)`` with means over valid tokens (detached; 0 off-mask)."""
    check_2d(logp=logp, advantages=advantages, mask=mask)
    mask = mask.astype(bool)
    lp = jax.lax.stop_gradient(logp.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    cov = (lp - _masked_mean(lp, mask)) * (adv - _masked_mean(adv, mask))
    return jnp.where(mask, cov, 0.0)


def _count(fraction, n):
    """``max(floor(fraction * n), 1)`` tokens, but none when there is nothing to choose from."""
    return jnp.where(n > 0, jnp.maximum(jnp.floor(fraction * n).astype(jnp.int32), 1), 0)


def top_fraction(score, mask, fraction: float):
    """Valid tokens whose ``score`` is among the top ``fraction`` (at least one). Ties at the threshold are all
    kept, so slightly more than the fraction can be chosen when scores repeat."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mask = mask.astype(bool)
    k = _count(fraction, mask.sum())
    ranked = jnp.sort(jnp.where(mask, score, -jnp.inf).reshape(-1))[::-1]
    threshold = ranked[jnp.maximum(k - 1, 0)]
    return mask & (score >= threshold) & (k > 0)


def clip_cov_select(cov, mask, key, *, ratio: float = 2e-4, low: float = 1.0, high: float = 5.0, candidates=None):
    """Clip-Cov's tokens to detach: ``max(floor(ratio * N), 1)`` tokens drawn uniformly (without replacement) from
    the valid tokens with ``low <= Cov_t <= high`` (``N`` = valid tokens; ``candidates`` narrows the pool, e.g. to
    tokens the PPO clip has not already cut off)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clip_cov ratio must be in (0, 1], got {ratio}")
    if not low < high:
        raise ValueError(f"clip_cov band must have low < high, got [{low}, {high}]")
    mask = mask.astype(bool)
    pool = mask & (cov >= low) & (cov <= high)
    if candidates is not None:
        pool = pool & candidates.astype(bool)
    k = jnp.minimum(_count(ratio, mask.sum()), pool.sum())
    priority = jnp.where(pool, jax.random.uniform(key, cov.shape), -1.0)
    ranked = jnp.sort(priority.reshape(-1))[::-1]
    threshold = ranked[jnp.maximum(k - 1, 0)]
    return pool & (priority >= threshold) & (k > 0)


def kl_cov_select(cov, mask, *, ratio: float = 2e-3):
    """KL-Cov's tokens: the top ``ratio`` fraction of valid tokens by covariance (at least one)."""
    return top_fraction(cov, mask, ratio)


def gate_gradient(logp, stop):
    """``logp`` with the gradient stopped where ``stop`` is true (values unchanged)."""
    return jnp.where(stop, jax.lax.stop_gradient(logp), logp)


def adaptive_entropy_coef(coef, entropy, *, target: float, step: float, max_coef: float):
    """Adaptive entropy control: raise the bonus coefficient by ``step`` while the policy's entropy is below
    ``target``, lower it otherwise, within ``[0, max_coef]``."""
    new = jnp.where(entropy < target, coef + step, coef - step)
    return jnp.clip(new, 0.0, max_coef)
