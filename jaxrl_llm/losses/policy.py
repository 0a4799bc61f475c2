"""Policy-gradient losses over ``[batch, time]`` token arrays. All are losses to *minimise* (= -objective).

Common signature::

    loss, metrics = fn(logp, old_logp, advantages, mask, *, agg="token-mean", is_weights=None,
                       normalizer=None, agg_constant=None, **knobs)

``logp`` are the current policy's per-token log-probs (differentiated), ``old_logp`` those of the policy that
generated the data, ``advantages`` per-token advantages, ``mask`` the response tokens that count.
``is_weights`` (treated as constants) multiply each token's loss: rollout correction for the sampler-trainer
mismatch plugs in here. ``agg``/``normalizer``/``agg_constant`` are passed to :func:`aggregate`.
Metrics are masked means over valid tokens (0 when nothing is valid).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.losses._checks import check_2d, check_choice, check_clip
from jaxrl_llm.losses.aggregate import aggregate

__all__ = ["ppo_clip", "gspo", "gspo_token", "cispo", "pg", "POLICY_LOSSES", "get_policy_loss"]


def _masked_mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(m.sum(), 1.0)


def _ratio_metrics(log_ratio, mask):
    ratio = jnp.exp(log_ratio)
    big = jnp.finfo(jnp.float32).max
    any_valid = mask.any()
    return {
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_max": jnp.where(any_valid, jnp.max(jnp.where(mask, ratio, -big)), 1.0),
        "ratio_min": jnp.where(any_valid, jnp.min(jnp.where(mask, ratio, big)), 1.0),
        # k3 estimate of KL(pi_old || pi) from tokens drawn under pi_old
        "approx_kl": _masked_mean(jnp.expm1(-log_ratio) + log_ratio, mask),
    }


def _prepare(logp, old_logp, advantages, mask, is_weights):
    check_2d(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, is_weights=is_weights)
    mask = mask.astype(bool)
    logp = logp.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    w = None if is_weights is None else jax.lax.stop_gradient(is_weights.astype(jnp.float32))
    return logp, old_logp, adv, mask, w


def _finish(per_token, mask, w, agg, normalizer, agg_constant, metrics):
    if w is not None:
        per_token = per_token * w
        metrics["is_weight_mean"] = _masked_mean(w, mask)
    loss = aggregate(per_token, mask, agg, normalizer=normalizer, constant=agg_constant)
    return loss, metrics


def _clipped_surrogate(ratio, adv, clip_low, clip_high):
    """Per-token PPO loss ``max(-A r, -A clip(r))`` and the masks of where each clip side is active."""
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    active = clipped > unclipped  # the clipped branch is taken: no gradient flows
    return loss, active & (ratio > 1.0), active & (ratio < 1.0)


def ppo_clip(logp, old_logp, advantages, mask, *, agg="token-mean", is_weights=None, normalizer=None,
             agg_constant=None, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """PPO clipped surrogate with asymmetric bounds and optional dual clip.

    ``L_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))`` with ``r_t = exp(logp - old_logp)``;
    ``clip_high > clip_low`` is DAPO's clip-higher. With ``dual_clip = c > 1``, for ``A_t < 0`` the loss is further
    bounded by ``-c A_t`` (the ratio's influence is capped at c when the advantage is negative).
    """
    check_clip(clip_low, clip_high)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    logp, old_logp, adv, mask, w = _prepare(logp, old_logp, advantages, mask, is_weights)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    loss, high, low = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    metrics = _ratio_metrics(log_ratio, mask)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (bound < loss)
        loss = jnp.where(adv < 0, jnp.minimum(loss, bound), loss)
        metrics["dual_clip_frac"] = _masked_mean(dual.astype(jnp.float32), mask)
    metrics["clip_frac_high"] = _masked_mean(high.astype(jnp.float32), mask)
    metrics["clip_frac_low"] = _masked_mean(low.astype(jnp.float32), mask)
    return _finish(loss, mask, w, agg, normalizer, agg_constant, metrics)


def _sequence_log_ratio(log_ratio, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, log_ratio, 0.0), axis=-1) / jnp.maximum(m.sum(axis=-1), 1.0)


def gspo(logp, old_logp, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None, normalizer=None,
         agg_constant=None, clip_low=3e-4, clip_high=4e-4):
    """GSPO: sequence-level ratio ``s_i = exp(mean_t(logp - old_logp))`` clipped to ``[1-clip_low, 1+clip_high]``.

    The sequence advantage ``A_i`` is the masked mean of ``advantages`` over the sequence (GRPO-style
    advantages are constant over a sequence). The sequence loss ``max(-A_i s_i, -A_i clip(s_i))`` is placed on
    every valid token of the sequence and reduced with ``agg`` (``seq-mean-token-mean`` gives the paper's
    ``1/G sum_i``).
    """
    check_clip(clip_low, clip_high)
    logp, old_logp, adv, mask, w = _prepare(logp, old_logp, advantages, mask, is_weights)
    log_ratio = logp - old_logp
    seq_lr = _sequence_log_ratio(log_ratio, mask)
    seq_adv = _sequence_log_ratio(adv, mask)  # masked mean over the sequence
    s = jnp.exp(seq_lr)
    seq_loss, high, low = _clipped_surrogate(s, seq_adv, clip_low, clip_high)
    per_token = jnp.broadcast_to(seq_loss[:, None], logp.shape)
    metrics = _ratio_metrics(log_ratio, mask)
    has = mask.any(axis=-1)
    n_seq = jnp.maximum(has.sum(), 1)
    metrics["seq_ratio_mean"] = jnp.sum(jnp.where(has, s, 0.0)) / n_seq
    metrics["clip_frac_high"] = jnp.sum(high & has) / n_seq
    metrics["clip_frac_low"] = jnp.sum(low & has) / n_seq
    return _finish(per_token, mask, w, agg, normalizer, agg_constant, metrics)


def gspo_token(logp, old_logp, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None, normalizer=None,
               agg_constant=None, clip_low=3e-4, clip_high=4e-4):
    """GSPO-token: ``s_it = sg(s_i) * pi_t / sg(pi_t)`` (value ``s_i``), token advantages ``A_it``.

    ``log s_it = logp_t - sg(logp_t) + sg(mean_t(logp - old_logp))``. When ``A_it = A_i`` for every token, loss,
    clipping and gradient equal :func:`gspo`'s.
    """
    check_clip(clip_low, clip_high)
    logp, old_logp, adv, mask, w = _prepare(logp, old_logp, advantages, mask, is_weights)
    log_ratio = logp - old_logp
    seq_lr = jax.lax.stop_gradient(_sequence_log_ratio(log_ratio, mask))
    log_s = logp - jax.lax.stop_gradient(logp) + seq_lr[:, None]
    s = jnp.exp(log_s)
    loss, high, low = _clipped_surrogate(s, adv, clip_low, clip_high)
    metrics = _ratio_metrics(log_ratio, mask)
    metrics["clip_frac_high"] = _masked_mean(high.astype(jnp.float32), mask)
    metrics["clip_frac_low"] = _masked_mean(low.astype(jnp.float32), mask)
    return _finish(loss, mask, w, agg, normalizer, agg_constant, metrics)


def cispo(logp, old_logp, advantages, mask, *, agg="token-mean", is_weights=None, normalizer=None,
          agg_constant=None, clip_low=1.0, clip_high=0.28):
    """CISPO (MiniMax-M1): ``L_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t``.

    The importance weight is clipped and detached, so every token keeps a gradient (unlike PPO, which zeroes
    clipped tokens). ``clip_low=1`` leaves the weight unbounded below, as in the paper.
    """
    check_clip(clip_low, clip_high)
    logp, old_logp, adv, mask, w = _prepare(logp, old_logp, advantages, mask, is_weights)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
    loss = -weight * adv * logp
    metrics = _ratio_metrics(log_ratio, mask)
    metrics["clip_frac_high"] = _masked_mean((ratio > 1.0 + clip_high).astype(jnp.float32), mask)
    metrics["clip_frac_low"] = _masked_mean((ratio < 1.0 - clip_low).astype(jnp.float32), mask)
    return _finish(loss, mask, w, agg, normalizer, agg_constant, metrics)


def pg(logp, old_logp, advantages, mask, *, agg="token-mean", is_weights=None, normalizer=None, agg_constant=None):
    """Plain (REINFORCE-style) policy gradient ``L_t = -A_t * logp_t``; ``old_logp`` only feeds metrics."""
    logp, old_logp, adv, mask, w = _prepare(logp, old_logp, advantages, mask, is_weights)
    metrics = _ratio_metrics(logp - old_logp, mask)
    return _finish(-adv * logp, mask, w, agg, normalizer, agg_constant, metrics)


POLICY_LOSSES = {"ppo_clip": ppo_clip, "gspo": gspo, "gspo_token": gspo_token, "cispo": cispo, "pg": pg}


def get_policy_loss(name: str):
    """Look a policy loss up by its config name."""
    check_choice("policy loss", name, POLICY_LOSSES)
    return POLICY_LOSSES[name]
