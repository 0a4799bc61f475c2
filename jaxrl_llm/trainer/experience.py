"""From scored rollouts to the update's input: reward shaping, KL to the reference, advantages, corrections.

:func:`make_experience` is a function of arrays only (no model call): the rollouts with their rewards
(:class:`jaxrl_llm.trainer.rollout.RolloutBatch`) and what the scoring passes found
(:class:`jaxrl_llm.trainer.scoring.Scores`) go in; the :class:`Experience` the update trains on comes out.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import advantages as A
from jaxrl_llm import losses as L
from jaxrl_llm.distributed import host
from jaxrl_llm.sampling import Rollout
from jaxrl_llm.trainer.critic import token_level_rewards
from jaxrl_llm.trainer.rollout import RolloutBatch
from jaxrl_llm.trainer.scoring import Scores
from jaxrl_llm.trainer.step import Experience

__all__ = ["CriticTargets", "StepExperience", "make_experience", "explained_variance"]

# one program (see scoring.py: collectives of op-by-op dispatch)
_rollout_correction = jax.jit(L.rollout_correction, static_argnames=("is_level", "cap", "mask_level", "low", "high"))


@dataclasses.dataclass
class CriticTargets:
    """What the critic regresses on (PPO): the values it predicted and the GAE returns, ``[N, R]``."""

    old_values: jax.Array
    returns: jax.Array


@dataclasses.dataclass
class StepExperience:
    experience: Experience
    rewards: np.ndarray  # [N] the sequence rewards trained on: reward functions + shaping + KL penalty
    critic_targets: CriticTargets | None
    metrics: dict[str, float]


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over valid tokens: how much of the return the critic predicts."""
    m = jnp.asarray(mask, jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)

    def var(x):
        mean = jnp.sum(x * m) / count
        return jnp.sum(jnp.square(x - mean) * m) / count

    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def _group_advantages(est: A.Estimator, rewards, ro: Rollout, old_logp, correct, algo, n: int):
    """Sequence advantages from the ``n`` samples of each prompt (with Differential Smoothing when set), on every
    response token."""
    adv = est.fn(jnp.asarray(rewards, jnp.float32).reshape(-1, n), algo).reshape(-1)
    if algo.ds_gamma_pos or algo.ds_gamma_neg:
        seq_logp = A.sequence_logprob(old_logp, ro.mask, length_norm=algo.ds_length_norm)
        adv = A.differential_smoothing(adv, seq_logp, jnp.asarray(correct), gamma_pos=algo.ds_gamma_pos,
                                       gamma_neg=algo.ds_gamma_neg)
    return A.broadcast_over_tokens(adv, ro.mask)


def _kl_to_reference(scores: Scores, ro: Rollout, algo, metrics: dict):
    """The per-token penalty ``-kl_coef * KL_t`` when the KL is part of the reward (else None); logs ``kl_ref``."""
    if scores.ref_logp is None:
        return None
    kl_tok = jnp.where(ro.mask, L.kl(scores.old_logp, scores.ref_logp, algo.kl_estimator), 0.0)
    metrics["kl_ref"] = float(jnp.sum(kl_tok) / jnp.maximum(ro.mask.sum(), 1))
    return -algo.kl_coef * kl_tok if algo.kl_in_reward else None


def make_experience(batch: RolloutBatch, ro: Rollout, scores: Scores, cfg) -> StepExperience:
    """The update's input for the rollouts ``ro`` (``batch.rollout``, possibly with its response axis trimmed)
    under the run config ``cfg``: rewards shaped (DAPO's overlong penalty, the KL penalty when it is part of the
    reward), advantages by the registered estimator ``algorithm.advantage``, rollout-correction weights."""
    a = cfg.algorithm
    metrics: dict[str, float] = {}
    is_weights = None
    if a.rollout_is != "none" or a.rollout_mask != "none":
        is_weights, rc = _rollout_correction(scores.old_logp, ro.logprobs, ro.mask, is_level=a.rollout_is,
                                              cap=a.rollout_is_cap, mask_level=a.rollout_mask,
                                              low=a.rollout_mask_low, high=a.rollout_mask_high)
        metrics.update(rc)
    kl_penalty = _kl_to_reference(scores, ro, a, metrics)
    rewards = batch.rewards
    if a.overlong_penalty:
        rewards = rewards + np.asarray(A.overlong_penalty(
            host(ro.lengths), max_len=cfg.rollout.max_new_tokens, cache_len=a.overlong_cache))
    est = A.get_advantage(a.advantage)
    # token-level credit puts the outcome on the last token and the KL on every token
    token_rewards = token_level_rewards(rewards, ro.mask, kl_penalty) if est.kind != "group" else None
    if kl_penalty is not None:  # the sequence reward trained on (and logged) includes the KL penalty
        rewards = rewards + host(jnp.sum(kl_penalty, axis=1))
    targets = None
    if est.kind == "critic":
        adv, returns = est.fn(token_rewards, scores.values, ro.mask, a)
        targets = CriticTargets(old_values=scores.values, returns=returns)
        metrics["explained_variance"] = float(explained_variance(scores.values, returns, ro.mask))
    elif est.kind == "token":
        adv = est.fn(token_rewards, ro.mask, a)
    else:
        adv = _group_advantages(est, rewards, ro, scores.old_logp, batch.correct, a, cfg.rollout.n)
    old_logp = scores.bupo_old_logp if scores.bupo_old_logp is not None else scores.old_logp
    exp = Experience(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens, mask=ro.mask,
                     advantages=adv, old_logp=old_logp, ref_logp=scores.ref_logp, is_weights=is_weights,
                     forced_experts=ro.experts if cfg.rollout.routing_replay else None, sampler_logp=ro.logprobs,
                     lengths=ro.lengths if cfg.rollout.consistency == "exact" else None)
    return StepExperience(exp, rewards, targets, metrics)
