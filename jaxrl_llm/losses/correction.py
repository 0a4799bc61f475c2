"""Rollout correction: importance weights for the gap between the sampler ``mu`` and the trainer ``pi``.

The tokens of a rollout are drawn from the sampler's distribution ``mu_old``, while the loss is built from the
trainer's ``pi_old``. When the two differ (another precision, other kernels, another MoE routing) "on-policy"
training is off-policy, and the per-token ratio ``rho_t = pi_old(y_t) / mu_old(y_t)`` corrects for it:

* truncated IS (TIS): weight ``min(rho, C)`` per token (``level="token"``) or one weight per sequence,
  ``min(prod_t rho_t, C)`` (``level="sequence"``);
* masked IS (MIS / rejection): drop tokens or whole sequences whose ratio leaves ``[low, high]``; the criterion is
  the token ratio (``token``), the sequence ratio ``prod_t rho_t`` (``sequence``) or its geometric mean
  ``exp(mean_t log rho_t)`` (``geometric``, length-independent).

Both give ``is_weights`` that the policy losses multiply into each token's loss (masked tokens get weight 0, so
normalisers, and hence the loss scale, are unchanged). Weights are constants: no gradient flows through them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.losses._checks import check_2d, check_choice

__all__ = ["IS_LEVELS", "MASK_LEVELS", "rollout_correction"]

IS_LEVELS = ("none", "token", "sequence")
MASK_LEVELS = ("none", "token", "sequence", "geometric")


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(mask.sum(), 1)


def rollout_correction(trainer_logp, sampler_logp, mask, *, is_level: str = "token", cap: float = 2.0,
                       mask_level: str = "none", low: float = 0.5, high: float = 2.0):
    """``(is_weights [B, T], metrics)`` correcting tokens sampled by ``mu`` (``sampler_logp``) for the trainer's
    ``pi`` (``trainer_logp``), both the log-probs of the same tokens under the same (old) parameters.

    ``is_level``/``cap``: truncated importance weights; ``mask_level``/``[low, high]``: rejection of tokens or
    sequences with extreme ratios. With ``is_level="none"`` kept tokens get weight 1.
    """
    check_choice("is_level", is_level, IS_LEVELS)
    check_choice("mask_level", mask_level, MASK_LEVELS)
    check_2d(trainer_logp=trainer_logp, sampler_logp=sampler_logp, mask=mask)
    if is_level != "none" and not cap >= 1.0:
        raise ValueError(f"the IS cap must be >= 1, got {cap}")
    if mask_level != "none" and not 0.0 <= low < 1.0 < high:
        raise ValueError(f"the masking band must satisfy 0 <= low < 1 < high, got [{low}, {high}]")
    mask = mask.astype(bool)
    log_rho = jnp.where(mask, trainer_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32), 0.0)
    log_rho = jax.lax.stop_gradient(log_rho)
    seq_log_rho = log_rho.sum(axis=-1, keepdims=True)
    n_tok = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)
    has = mask.any(axis=-1, keepdims=True)

    # log-space caps keep exp() finite however far the sequence ratio drifts
    log_cap = jnp.log(jnp.float32(cap))
    if is_level == "token":
        weights = jnp.exp(jnp.minimum(log_rho, log_cap))
        truncated = mask & (log_rho > log_cap)
    elif is_level == "sequence":
        weights = jnp.broadcast_to(jnp.exp(jnp.minimum(seq_log_rho, log_cap)), log_rho.shape)
        truncated = mask & (seq_log_rho > log_cap)
    else:
        weights = jnp.ones_like(log_rho)
        truncated = jnp.zeros_like(mask)

    if mask_level == "none":
        keep = mask
    else:
        lo, hi = jnp.log(jnp.float32(max(low, 1e-30))), jnp.log(jnp.float32(high))
        crit = {"token": log_rho, "sequence": seq_log_rho, "geometric": seq_log_rho / n_tok}[mask_level]
        keep = mask & (crit >= lo) & (crit <= hi)
    weights = jnp.where(keep, weights, 0.0)

    rho = jnp.exp(log_rho)
    seq_kept = (keep.any(axis=-1) | ~has[:, 0]).astype(jnp.float32)
    n_seq = jnp.maximum(has.sum(), 1)
    metrics = {
        "rc_weight_mean": _masked_mean(weights, mask),
        "rc_weight_max": jnp.max(jnp.where(mask, weights, 0.0)),
        "rc_ratio_mean": _masked_mean(rho, mask),
        "rc_ratio_max": jnp.max(jnp.where(mask, rho, 0.0)),
        "rc_ratio_min": jnp.where(mask.any(), jnp.min(jnp.where(mask, rho, jnp.inf)), 1.0),
        "rc_truncated_frac": _masked_mean(truncated.astype(jnp.float32), mask),
        "rc_masked_frac": _masked_mean((mask & ~keep).astype(jnp.float32), mask),
        "rc_masked_seq_frac": jnp.sum(jnp.where(has[:, 0], 1.0 - seq_kept, 0.0)) / n_seq,
    }
    return weights, metrics
