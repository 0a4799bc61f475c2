"""The jitted policy-update step: micro-batch gradient accumulation, loss terms, optax update.

The step is one pure function of (parameters, optimizer state, minibatch). The minibatch arrives with a leading
micro-batch axis ``[num_micro, micro_batch, ...]``; gradients are summed over a ``lax.scan`` of micro-batches.
Every loss term is aggregated with a *global* normaliser (the token or sequence count of the whole minibatch), so
summing micro-batch gradients gives exactly the gradient of the whole minibatch, whatever the split.

A non-finite loss or gradient skips the update (parameters and optimizer state are returned unchanged) and is
reported in the metrics, so a NaN never reaches the parameters or a checkpoint.
"""
from __future__ import annotations

import functools
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

__all__ = ["Experience", "Metric", "make_loss_fn", "make_update_step", "jit_update_step", "split_micro",
           "minibatch_normalizer", "accumulate", "apply_if_finite", "loss_kl_coef", "has_entropy_bonus",
           "policy_kwargs"]


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
    # (logp, entropy) float32[N, R] each at the update's weights from the sampler's decode step (exact
    # consistency): filled by the update step's decode pass, the values its loss differentiates
    decoded: Any = None
    lengths: jax.Array | None = None  # int32[N] tokens the sampler generated per row (exact consistency)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


@flax.struct.dataclass
class Metric:
    """One micro-batch's value of a metric, and how micro-batches combine into the minibatch's value:

    * ``sum``: a loss term that already carries the minibatch's global normaliser (or a count);
    * ``max``: a non-negative maximum;
    * ``mean``: a mean over the micro-batch's tokens, weighted by its share of the minibatch's tokens.
    """

    value: jax.Array
    reduce: str = flax.struct.field(pytree_node=False, default="mean")


def _means(metrics: dict) -> dict[str, Metric]:
    return {k: Metric(v, "mean") for k, v in metrics.items()}


def _combine(a: Metric, b: Metric) -> Metric:
    return a.replace(value=(jnp.maximum if a.reduce == "max" else jnp.add)(a.value, b.value))


def _is_metric(x) -> bool:
    return isinstance(x, Metric)


def minibatch_normalizer(mask: jax.Array, algo) -> jax.Array:
    """The global normaliser for ``aggregate`` over a whole minibatch ``mask [..., R]`` under the settings ``algo``
    (``AlgorithmSection``)."""
    return L.global_normalizer(mask.reshape(-1, mask.shape[-1]), algo.loss_agg)


def loss_kl_coef(algo) -> float:
    """The KL coefficient of the loss: 0 when the KL is part of the reward instead (``kl_in_reward``)."""
    return 0.0 if algo.kl_in_reward else algo.kl_coef


def has_entropy_bonus(algo) -> bool:
    return bool(algo.entropy_coef) or algo.entropy_target is not None


def policy_kwargs(algo) -> dict[str, Any]:
    """The keyword arguments of ``losses.get_policy_loss(algo.policy_loss)`` that ``algo`` sets."""
    kwargs: dict[str, Any] = {}
    if algo.policy_loss in ("ppo_clip", "gspo", "gspo_token", "cispo"):
        kwargs.update(clip_low=algo.clip_low, clip_high=algo.clip_high)
    if algo.policy_loss == "ppo_clip" and algo.dual_clip is not None:
        kwargs["dual_clip"] = algo.dual_clip
    return kwargs


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


def accumulate(micro_grads: Callable[[Any], Any], micro_batches, grad_shardings=None):
    """Sum ``micro_grads(micro) -> (grads, {name: Metric})`` over the leading micro-batch axis of
    ``micro_batches`` with a ``lax.scan``, so only one micro-batch's activations are live at a time; each metric
    combines as its :class:`Metric` says. Returns ``(grads, {name: value})``.

    ``grad_shardings`` (the parameters' shardings) pins the gradient accumulator to them: it starts as zeros,
    which XLA would otherwise be free to replicate on every device."""
    first = jax.tree.map(lambda x: x[0], micro_batches)

    def pin(acc):
        if grad_shardings is None:
            return acc
        return jax.lax.with_sharding_constraint(acc[0], grad_shardings), acc[1]

    zeros = pin(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_grads, first)))

    def body(acc, micro):
        grads, metrics = micro_grads(micro)
        total = jax.tree.map(jnp.add, acc[0], grads)
        return pin((total, jax.tree.map(_combine, acc[1], metrics, is_leaf=_is_metric))), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, micro_batches)
    return grads, {k: m.value for k, m in metrics.items()}


def apply_if_finite(optimizer: optax.GradientTransformation, grads, params, opt_state, finite):
    """The optax update, or parameters and optimizer state unchanged when ``finite`` is false (a NaN/inf loss or
    gradient never reaches the parameters or a checkpoint)."""
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
        return jnp.where(finite, new, old)

    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)


LogprobFn = Callable[[Any, Experience], tuple[jax.Array, jax.Array]]


def _token_gates(algo, logp, old_logp, entropy, micro: Experience, key, metrics: dict):
    """Tokens whose policy gradient is stopped (high-entropy-token training, Clip-Cov) and KL-Cov's extra loss
    per token; fills the selection metrics."""
    mask = micro.mask.astype(bool)
    stop = jnp.zeros(mask.shape, bool)
    extra = None
    if algo.entropy_token_frac < 1.0:
        top = X.top_fraction(jax.lax.stop_gradient(entropy), mask, algo.entropy_token_frac)
        stop = stop | (mask & ~top)
        metrics["pg_tokens"] = Metric(top.sum().astype(jnp.float32), "sum")
    if algo.cov_penalty != "none":
        cov = X.token_covariance(logp, micro.advantages, mask)
        n = jnp.maximum(mask.sum(), 1)
        metrics["cov_mean"] = Metric(cov.sum() / n)
        metrics["cov_max"] = Metric(jnp.where(mask.any(), jnp.max(jnp.where(mask, cov, -jnp.inf)), 0.0))
        if algo.cov_penalty == "clip_cov":
            ratio = jnp.exp(jax.lax.stop_gradient(logp) - old_logp)
            adv = micro.advantages
            ppo_clipped = ((adv > 0) & (ratio > 1 + algo.clip_high)) | ((adv < 0) & (ratio < 1 - algo.clip_low))
            chosen = X.clip_cov_select(cov, mask, key, ratio=algo.clip_cov_ratio, low=algo.clip_cov_low,
                                       high=algo.clip_cov_high, candidates=~ppo_clipped)
            stop = stop | chosen
        else:
            chosen = X.kl_cov_select(cov, mask, ratio=algo.kl_cov_ratio)
            extra = jnp.where(chosen, jnp.abs(logp - old_logp), 0.0)
        metrics["cov_selected"] = Metric(chosen.sum().astype(jnp.float32), "sum")
    return stop, extra


def _train_sampler(sampler_logp, trainer_logp, mask) -> dict[str, Metric]:
    """``train_sampler_*``: the gap between the log-probs the loss differentiates and the sampler's over a
    micro-batch (the maximum combines as a maximum). Its k3 KL is the policy's drift from the sampler."""
    return {k: Metric(v, "max" if k.endswith("_abs_max") else "mean")
            for k, v in mismatch_metrics(sampler_logp, trainer_logp, mask, prefix="train_sampler").items()}


def make_loss_fn(graphdef, algo, logprob_fn: LogprobFn, agg_constant: float | None = None):
    """``loss_fn(params, rest, micro, normalizer, control) -> (loss, {name: Metric})`` of one micro-batch under the
    loss settings ``algo`` (the run's ``AlgorithmSection``); see :func:`make_update_step`."""
    policy_fn = L.get_policy_loss(algo.policy_loss)
    kwargs = policy_kwargs(algo)
    kl_coef = loss_kl_coef(algo)
    agg = functools.partial(L.aggregate, mode=algo.loss_agg, constant=agg_constant)

    def loss_fn(params, rest, micro: Experience, normalizer, control):
        model = flax.nnx.merge(graphdef, params, rest)
        logp, entropy = logprob_fn(model, micro)
        metrics: dict[str, Metric] = {}
        old_logp = micro.old_logp
        if old_logp is None:  # one update on fresh rollouts: the policy before it is the one being differentiated
            old_logp = jax.lax.stop_gradient(logp)
        if micro.sampler_logp is not None:  # the log-probs the gradient flows through against the sampler's
            metrics.update(_train_sampler(micro.sampler_logp, jax.lax.stop_gradient(logp), micro.mask))
        stop, extra = _token_gates(algo, logp, old_logp, entropy, micro, control["key"], metrics)
        loss, policy_metrics = policy_fn(X.gate_gradient(logp, stop), old_logp, micro.advantages,
                                         micro.mask, agg=algo.loss_agg, is_weights=micro.is_weights,
                                         normalizer=normalizer, agg_constant=agg_constant, **kwargs)
        metrics.update(_means(policy_metrics))
        metrics["policy_loss"] = Metric(loss, "sum")
        ent = agg(entropy, micro.mask, normalizer=normalizer)
        metrics["entropy"] = Metric(ent, "sum")
        if has_entropy_bonus(algo):
            loss = loss - control["entropy_coef"] * ent
        if extra is not None:
            kl_cov = agg(extra, micro.mask, normalizer=normalizer)
            metrics["kl_cov_loss"] = Metric(kl_cov, "sum")
            loss = loss + algo.kl_cov_coef * kl_cov
        if kl_coef:
            kl_tok = L.kl(logp, micro.ref_logp, algo.kl_estimator)
            kl_term = agg(kl_tok, micro.mask, normalizer=normalizer)
            metrics["kl_loss"] = Metric(kl_term, "sum")
            loss = loss + kl_coef * kl_term
        metrics["loss"] = Metric(loss, "sum")
        return loss, metrics

    return loss_fn


def make_update_step(graphdef, optimizer: optax.GradientTransformation, algo, logprob_fn: LogprobFn,
                     param_shardings=None, agg_constant: float | None = None, decode_pass=None):
    """Build ``update(params, rest, opt_state, micro_batches, normalizer, control=None)
    -> (params, opt_state, metrics)`` for the loss settings ``algo`` (the run's ``AlgorithmSection``).
    ``agg_constant`` is the normaliser of ``seq-mean-token-sum-norm`` (Dr. GRPO; None: the padded length).

    ``logprob_fn(model, experience) -> (logp [n, R], entropy [n, R])`` computes the current policy's per-token
    log-probs and entropies (the sampler-consistent scoring function with the rollout temperature bound in).
    ``control`` holds per-update runtime values: ``entropy_coef`` (adaptive entropy control) and ``key`` (the
    PRNG key of Clip-Cov's random choice; folded with the micro-batch index). ``param_shardings`` keeps the
    gradients sharded like the parameters (see :func:`accumulate`). ``decode_pass(model, micro_batches) ->
    micro_batches``, if given, runs once per update before the gradients, over all micro-batches together
    (``exact`` consistency fills ``Experience.decoded`` with the sampler's decode step over the batch as sampled).
    """
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, algo, logprob_fn, agg_constant), has_aux=True)

    def update(params, rest, opt_state, micro_batches: Experience, normalizer, control=None):
        control = dict(control or {})
        control.setdefault("entropy_coef", jnp.float32(algo.entropy_coef))
        control.setdefault("key", jax.random.key(0))
        weight_total = jnp.maximum(micro_batches.mask.sum(), 1)
        num_micro = micro_batches.mask.shape[0]
        if decode_pass is not None:
            micro_batches = decode_pass(flax.nnx.merge(graphdef, params, rest), micro_batches)

        def micro_grads(xs):
            micro, i = xs
            ctl = dict(control, key=jax.random.fold_in(control["key"], i))
            (_, metrics), grads = grad_fn(params, rest, micro, normalizer, ctl)
            share = micro.mask.sum() / weight_total  # a per-micro mean's weight in the minibatch's mean
            return grads, {k: m.replace(value=m.value * share) if m.reduce == "mean" else m
                           for k, m in metrics.items()}

        grads, metrics = accumulate(micro_grads, (micro_batches, jnp.arange(num_micro)), param_shardings)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        new_params, new_opt_state = apply_if_finite(optimizer, grads, params, opt_state, finite)
        metrics["grad_norm"] = grad_norm
        metrics["skipped_nonfinite"] = (~finite).astype(jnp.float32)
        if has_entropy_bonus(algo):
            metrics["entropy_coef"] = jnp.asarray(control["entropy_coef"], jnp.float32)
        return new_params, new_opt_state, metrics

    return update


def jit_update_step(graphdef, optimizer: optax.GradientTransformation, algo, logprob_fn: LogprobFn,
                    param_shardings, rest_shardings, opt_shardings, agg_constant: float | None = None,
                    decode_pass=None):
    """:func:`make_update_step`, jitted as the trainer runs it (and the planner compiles it): parameters and
    optimizer state keep their shardings and are donated; compiled like the sampler, so that its log-probs round
    like the sampler's (``compile_options.py``)."""
    step = make_update_step(graphdef, optimizer, algo, logprob_fn, param_shardings, agg_constant, decode_pass)
    return jax.jit(step, in_shardings=(param_shardings, rest_shardings, opt_shardings, None, None, None),
                   out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 2),
                   compiler_options=compiler_options())
