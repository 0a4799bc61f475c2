"""The jitted policy-update step: micro-batch gradient accumulation, loss terms, optax update.

The step is one pure function of (parameters, optimizer state, minibatch). The minibatch arrives with a leading
micro-batch axis ``[num_micro, micro_batch, ...]``; gradients are summed over a ``lax.scan`` of micro-batches.
Every loss term is aggregated with a *global* normaliser (the token or sequence count of the whole minibatch), so
summing micro-batch gradients gives exactly the gradient of the whole minibatch, whatever the split.

A non-finite loss or gradient skips the update (parameters and optimizer state are returned unchanged) and is
reported in the metrics, so a NaN never reaches the parameters or a checkpoint.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import losses as L

__all__ = ["Experience", "LossConfig", "make_update_step", "split_micro", "minibatch_normalizer", "accumulate",
           "apply_if_finite"]


@flax.struct.dataclass
class Experience:
    """One batch of rollouts, every leaf ``[N, ...]`` (row i = one sampled response)."""

    prompt_ids: jax.Array  # int32[N, P], left-padded
    prompt_mask: jax.Array  # bool[N, P]
    tokens: jax.Array  # int32[N, R] response tokens (padding after the end)
    mask: jax.Array  # bool[N, R] tokens that enter the loss
    advantages: jax.Array  # float32[N, R]
    old_logp: jax.Array  # float32[N, R] log-probs under the policy that sampled (trainer numerics)
    ref_logp: jax.Array | None = None  # float32[N, R], only with a KL term in the loss
    is_weights: jax.Array | None = None  # float32[N, R] rollout-correction weights
    forced_experts: jax.Array | None = None  # int32[L, N, P+R, k] recorded MoE routing to replay

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static description of the update's loss (hashable, so it can key jit caches)."""

    policy_loss: str = "ppo_clip"
    agg: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    agg_constant: float | None = None  # Dr. GRPO's constant normaliser (e.g. the response-token budget)

    def policy_knobs(self) -> dict[str, Any]:
        knobs: dict[str, Any] = {}
        if self.policy_loss in ("ppo_clip", "gspo", "gspo_token", "cispo"):
            knobs.update(clip_low=self.clip_low, clip_high=self.clip_high)
        if self.policy_loss == "ppo_clip" and self.dual_clip is not None:
            knobs["dual_clip"] = self.dual_clip
        return knobs


def minibatch_normalizer(mask: jax.Array, cfg: LossConfig) -> jax.Array:
    """The global normaliser for ``aggregate`` over a whole minibatch ``mask [..., R]``."""
    return L.global_normalizer(mask.reshape(-1, mask.shape[-1]), cfg.agg, constant=cfg.agg_constant)


def split_micro(exp: Experience, num_micro: int) -> Experience:
    """Reshape ``[N, ...]`` leaves to ``[num_micro, N // num_micro, ...]`` (MoE routes have N on axis 1)."""
    n = exp.num_rows
    if n % num_micro:
        raise ValueError(f"minibatch of {n} rows does not split into {num_micro} micro-batches")

    def reshape(x, axis=0):
        shape = x.shape[:axis] + (num_micro, n // num_micro) + x.shape[axis + 1:]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    routes = exp.forced_experts
    exp = exp.replace(forced_experts=None)
    exp = jax.tree.map(reshape, exp)
    if routes is not None:
        exp = exp.replace(forced_experts=reshape(routes, axis=1))
    return exp


def accumulate(micro_grads: Callable[[Any], Any], micro_batches):
    """Sum ``micro_grads(micro)`` (any pytree, e.g. ``(grads, metrics)``) over the leading micro-batch axis of
    ``micro_batches`` with a ``lax.scan``, so only one micro-batch's activations are live at a time."""
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_grads, first))

    def body(acc, micro):
        return jax.tree.map(jnp.add, acc, micro_grads(micro)), None

    total, _ = jax.lax.scan(body, zeros, micro_batches)
    return total


def apply_if_finite(optimizer: optax.GradientTransformation, grads, params, opt_state, finite):
    """The optax update, or parameters and optimizer state unchanged when ``finite`` is false (a NaN/inf loss or
    gradient never reaches the parameters or a checkpoint)."""
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
        return jnp.where(finite, new, old)

    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)


LogprobFn = Callable[[Any, Experience], tuple[jax.Array, jax.Array]]


def make_update_step(graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig, logprob_fn: LogprobFn):
    """Build ``update(params, rest, opt_state, micro_batches, normalizer) -> (params, opt_state, metrics)``.

    ``logprob_fn(model, experience) -> (logp [n, R], entropy [n, R])`` computes the current policy's per-token
    log-probs and entropies (the sampler-consistent scoring function with the rollout temperature bound in).
    """
    policy_fn = L.get_policy_loss(cfg.policy_loss)
    knobs = cfg.policy_knobs()

    def loss_fn(params, rest, micro: Experience, normalizer):
        model = flax.nnx.merge(graphdef, params, rest)
        logp, entropy = logprob_fn(model, micro)
        loss, metrics = policy_fn(logp, micro.old_logp, micro.advantages, micro.mask, agg=cfg.agg,
                                  is_weights=micro.is_weights, normalizer=normalizer, **knobs)
        metrics = dict(metrics)
        metrics["policy_loss"] = loss
        ent = L.aggregate(entropy, micro.mask, cfg.agg, normalizer=normalizer)
        metrics["entropy"] = ent
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
        if cfg.kl_coef:
            kl_tok = L.kl(logp, micro.ref_logp, cfg.kl_estimator)
            kl_term = L.aggregate(kl_tok, micro.mask, cfg.agg, normalizer=normalizer)
            metrics["kl_loss"] = kl_term
            loss = loss + cfg.kl_coef * kl_term
        metrics["loss"] = loss
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, rest, opt_state, micro_batches: Experience, normalizer):
        weight_total = jnp.maximum(micro_batches.mask.sum(), 1)

        def micro_grads(micro):
            (_, metrics), grads = grad_fn(params, rest, micro, normalizer)
            # summed losses already carry the global normaliser; metrics that are per-micro means are
            # re-weighted by each micro-batch's share of the tokens
            share = micro.mask.sum() / weight_total
            return grads, {k: (v if k in _SUMMED else v * share) for k, v in metrics.items()}

        grads, metrics = accumulate(micro_grads, micro_batches)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        new_params, new_opt_state = apply_if_finite(optimizer, grads, params, opt_state, finite)
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["skipped_nonfinite"] = (~finite).astype(jnp.float32)
        return new_params, new_opt_state, metrics

    return update


# loss terms that are sums over micro-batches (global normaliser); everything else is a per-micro mean
_SUMMED = frozenset({"loss", "policy_loss", "entropy", "kl_loss"})
