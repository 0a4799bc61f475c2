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
from jaxrl_llm.compile_options import compiler_options
from jaxrl_llm.losses import exploration as X
from jaxrl_llm.sampling.consistency import mismatch_metrics

__all__ = ["Experience", "LossConfig", "make_update_step", "jit_update_step", "split_micro", "minibatch_normalizer",
           "accumulate", "apply_if_finite"]


@flax.struct.dataclass
class Experience:
    """One batch of rollouts, every leaf ``[N, ...]`` (row i = one sampled response)."""

    prompt_ids: jax.Array  # int32[N, P], left-padded
    prompt_mask: jax.Array  # bool[N, P]
    tokens: jax.Array  # int32[N, R] response tokens (padding after the end)
    mask: jax.Array  # bool[N, R] tokens that enter the loss
    advantages: jax.Array  # float32[N, R]
    # float32[N, R] log-probs under the policy that sampled (trainer numerics); None: the update's own forward
    # provides them (stop-gradient), valid when the step makes a single update on fresh rollouts
    old_logp: jax.Array | None
    ref_logp: jax.Array | None = None  # float32[N, R], only with a KL term in the loss
    is_weights: jax.Array | None = None  # float32[N, R] rollout-correction weights
    forced_experts: jax.Array | None = None  # int32[L, N, P+R, k] recorded MoE routing to replay
    sampler_logp: jax.Array | None = None  # float32[N, R] the sampler's log-probs (off-policy drift metrics)
    packing: Any = None  # a packing.Packing of the responses (shared prompts), planned per minibatch

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
    entropy_coef: float = 0.0  # the bonus weight (the starting value when entropy_target is set)
    entropy_target: float | None = None  # adaptive entropy control: the coefficient is a runtime input
    entropy_token_frac: float = 1.0  # < 1: only the top fraction of tokens by entropy get policy gradient
    agg_constant: float | None = None  # Dr. GRPO's constant normaliser (e.g. the response-token budget)
    cov_penalty: str = "none"  # none | clip_cov | kl_cov (arXiv 2505.22617)
    clip_cov_ratio: float = 2e-4
    clip_cov_low: float = 1.0
    clip_cov_high: float = 5.0
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0

    @classmethod
    def of(cls, cfg) -> "LossConfig":
        """The loss settings of a run config (``TrainConfig``): its algorithm section, with the KL left to the reward
        when ``kl_in_reward`` and the aggregation constant defaulting to the generation budget."""
        a = cfg.algorithm
        return cls(policy_loss=a.policy_loss, agg=a.loss_agg, clip_low=a.clip_low, clip_high=a.clip_high,
                   dual_clip=a.dual_clip, kl_coef=0.0 if a.kl_in_reward else a.kl_coef, kl_estimator=a.kl_estimator,
                   entropy_coef=a.entropy_coef, entropy_target=a.entropy_target,
                   entropy_token_frac=a.entropy_token_frac,
                   agg_constant=a.agg_constant or float(cfg.rollout.max_new_tokens),
                   cov_penalty=a.cov_penalty, clip_cov_ratio=a.clip_cov_ratio, clip_cov_low=a.clip_cov_low,
                   clip_cov_high=a.clip_cov_high, kl_cov_ratio=a.kl_cov_ratio, kl_cov_coef=a.kl_cov_coef)

    @property
    def entropy_bonus(self) -> bool:
        return bool(self.entropy_coef) or self.entropy_target is not None

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

    def reshape(x, axis=0):  # a leaf's own row count: packed layouts have their own
        shape = x.shape[:axis] + (num_micro, x.shape[axis] // num_micro) + x.shape[axis + 1:]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    routes = exp.forced_experts
    exp = exp.replace(forced_experts=None)
    exp = jax.tree.map(reshape, exp)
    if routes is not None:
        exp = exp.replace(forced_experts=reshape(routes, axis=1))
    return exp


def accumulate(micro_grads: Callable[[Any], Any], micro_batches, grad_shardings=None, maxed=frozenset()):
    """Sum ``micro_grads(micro) -> (grads, metrics)`` over the leading micro-batch axis of ``micro_batches`` with a
    ``lax.scan``, so only one micro-batch's activations are live at a time. Metrics named in ``maxed`` (non-negative)
    take the maximum instead of the sum.

    ``grad_shardings`` (the parameters' shardings) pins the gradient accumulator to them: it starts as zeros,
    which XLA would otherwise be free to replicate on every device."""
    first = jax.tree.map(lambda x: x[0], micro_batches)

    def pin(acc):
        if grad_shardings is None:
            return acc
        return jax.lax.with_sharding_constraint(acc[0], grad_shardings), acc[1]

    zeros = pin(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_grads, first)))

    def combine(acc, new):
        grads = jax.tree.map(jnp.add, acc[0], new[0])
        metrics = {k: (jnp.maximum if k in maxed else jnp.add)(v, new[1][k]) for k, v in acc[1].items()}
        return grads, metrics

    def body(acc, micro):
        return pin(combine(acc, micro_grads(micro))), None

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


def _token_gates(cfg: LossConfig, logp, old_logp, entropy, micro: Experience, key, metrics: dict):
    """Tokens whose policy gradient is stopped (high-entropy-token training, Clip-Cov) and KL-Cov's extra loss
    per token; fills the selection metrics."""
    mask = micro.mask.astype(bool)
    stop = jnp.zeros(mask.shape, bool)
    extra = None
    if cfg.entropy_token_frac < 1.0:
        top = X.top_fraction(jax.lax.stop_gradient(entropy), mask, cfg.entropy_token_frac)
        stop = stop | (mask & ~top)
        metrics["pg_tokens"] = top.sum().astype(jnp.float32)
    if cfg.cov_penalty != "none":
        cov = X.token_covariance(logp, micro.advantages, mask)
        n = jnp.maximum(mask.sum(), 1)
        metrics["cov_mean"] = cov.sum() / n
        metrics["cov_max"] = jnp.where(mask.any(), jnp.max(jnp.where(mask, cov, -jnp.inf)), 0.0)
        if cfg.cov_penalty == "clip_cov":
            ratio = jnp.exp(jax.lax.stop_gradient(logp) - old_logp)
            adv = micro.advantages
            ppo_clipped = ((adv > 0) & (ratio > 1 + cfg.clip_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_low))
            chosen = X.clip_cov_select(cov, mask, key, ratio=cfg.clip_cov_ratio, low=cfg.clip_cov_low,
                                       high=cfg.clip_cov_high, candidates=~ppo_clipped)
            stop = stop | chosen
        else:
            chosen = X.kl_cov_select(cov, mask, ratio=cfg.kl_cov_ratio)
            extra = jnp.where(chosen, jnp.abs(logp - old_logp), 0.0)
        metrics["cov_selected"] = chosen.sum().astype(jnp.float32)
    return stop, extra


def make_update_step(graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig, logprob_fn: LogprobFn,
                     param_shardings=None):
    """Build ``update(params, rest, opt_state, micro_batches, normalizer, control=None)
    -> (params, opt_state, metrics)``.

    ``logprob_fn(model, experience) -> (logp [n, R], entropy [n, R])`` computes the current policy's per-token
    log-probs and entropies (the sampler-consistent scoring function with the rollout temperature bound in).
    ``control`` holds per-update runtime values: ``entropy_coef`` (adaptive entropy control) and ``key`` (the
    PRNG key of Clip-Cov's random choice; folded with the micro-batch index). ``param_shardings`` keeps the
    gradients sharded like the parameters (see :func:`accumulate`).
    """
    policy_fn = L.get_policy_loss(cfg.policy_loss)
    knobs = cfg.policy_knobs()

    def loss_fn(params, rest, micro: Experience, normalizer, control):
        model = flax.nnx.merge(graphdef, params, rest)
        logp, entropy = logprob_fn(model, micro)
        metrics: dict[str, jax.Array] = {}
        old_logp = micro.old_logp
        if old_logp is None:  # one update on fresh rollouts: the policy before it is the one being differentiated
            old_logp = jax.lax.stop_gradient(logp)
            if micro.sampler_logp is not None:  # the sampler-trainer mismatch, without a scoring pass of its own
                metrics.update(mismatch_metrics(micro.sampler_logp, old_logp, micro.mask))
        stop, extra = _token_gates(cfg, logp, old_logp, entropy, micro, control["key"], metrics)
        loss, policy_metrics = policy_fn(X.gate_gradient(logp, stop), old_logp, micro.advantages,
                                         micro.mask, agg=cfg.agg, is_weights=micro.is_weights,
                                         normalizer=normalizer, **knobs)
        metrics.update(policy_metrics)
        metrics["policy_loss"] = loss
        ent = L.aggregate(entropy, micro.mask, cfg.agg, normalizer=normalizer)
        metrics["entropy"] = ent
        if cfg.entropy_bonus:
            loss = loss - control["entropy_coef"] * ent
        if extra is not None:
            kl_cov = L.aggregate(extra, micro.mask, cfg.agg, normalizer=normalizer)
            metrics["kl_cov_loss"] = kl_cov
            loss = loss + cfg.kl_cov_coef * kl_cov
        if cfg.kl_coef:
            kl_tok = L.kl(logp, micro.ref_logp, cfg.kl_estimator)
            kl_term = L.aggregate(kl_tok, micro.mask, cfg.agg, normalizer=normalizer)
            metrics["kl_loss"] = kl_term
            loss = loss + cfg.kl_coef * kl_term
        if micro.sampler_logp is not None:
            # drift of the policy being updated from the sampler that drew the tokens: k3 estimate of KL(mu || pi)
            d = jax.lax.stop_gradient(logp) - micro.sampler_logp
            metrics["offpolicy_kl"] = jnp.sum(jnp.where(micro.mask, jnp.expm1(d) - d, 0.0)) / jnp.maximum(
                micro.mask.sum(), 1)
        metrics["loss"] = loss
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, rest, opt_state, micro_batches: Experience, normalizer, control=None):
        control = dict(control or {})
        control.setdefault("entropy_coef", jnp.float32(cfg.entropy_coef))
        control.setdefault("key", jax.random.key(0))
        weight_total = jnp.maximum(micro_batches.mask.sum(), 1)
        num_micro = micro_batches.mask.shape[0]

        def micro_grads(xs):
            micro, i = xs
            ctl = dict(control, key=jax.random.fold_in(control["key"], i))
            (_, metrics), grads = grad_fn(params, rest, micro, normalizer, ctl)
            # summed losses already carry the global normaliser; metrics that are per-micro means are
            # re-weighted by each micro-batch's share of the tokens
            share = micro.mask.sum() / weight_total
            return grads, {k: (v if k in _SUMMED or k in _MAXED else v * share) for k, v in metrics.items()}

        grads, metrics = accumulate(micro_grads, (micro_batches, jnp.arange(num_micro)), param_shardings, _MAXED)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        new_params, new_opt_state = apply_if_finite(optimizer, grads, params, opt_state, finite)
        metrics = dict(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["skipped_nonfinite"] = (~finite).astype(jnp.float32)
        if cfg.entropy_bonus:
            metrics["entropy_coef"] = jnp.asarray(control["entropy_coef"], jnp.float32)
        return new_params, new_opt_state, metrics

    return update


# loss terms that are sums over micro-batches (global normaliser); maxima over micro-batches; everything else is a
# per-micro mean
_SUMMED = frozenset({"loss", "policy_loss", "entropy", "kl_loss", "kl_cov_loss", "cov_selected", "pg_tokens"})
_MAXED = frozenset({"mismatch_abs_max"})


def jit_update_step(graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig, logprob_fn: LogprobFn,
                    param_shardings, rest_shardings, opt_shardings):
    """:func:`make_update_step`, jitted as the trainer runs it (and the planner compiles it): parameters and
    optimizer state keep their shardings and are donated; compiled like the sampler, so that its log-probs round
    like the sampler's (``compile_options.py``)."""
    step = make_update_step(graphdef, optimizer, cfg, logprob_fn, param_shardings)
    return jax.jit(step, in_shardings=(param_shardings, rest_shardings, opt_shardings, None, None, None),
                   out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 2),
                   compiler_options=compiler_options())
