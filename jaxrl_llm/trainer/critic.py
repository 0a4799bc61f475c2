"""PPO's learned critic: a separate value model (a decoder trunk plus a linear value head) and its update step.

``V_t`` is the value of the state *before* response token ``t`` is emitted: the head reads the same hidden state
that predicts token ``t`` (position ``P - 1 + t`` of ``[prompt | response]``), so ``delta_t = r_t + gamma V_{t+1}
- V_t`` in :func:`jaxrl_llm.advantages.gae` lines up token for token with the policy's log-probs.

The head starts at zero, so the first advantages are the plain returns; the trunk starts from the policy
checkpoint (the usual choice when no reward model is at hand).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import losses as L
from jaxrl_llm.sampling.score import response_hidden
from jaxrl_llm.trainer.step import Metric, accumulate, apply_if_finite

__all__ = ["init_value_head", "token_values", "make_critic_step", "token_level_rewards"]


def init_value_head(hidden_size: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    return {"w": jnp.zeros((hidden_size,), dtype), "b": jnp.zeros((), dtype)}


def token_values(model, head, prompt_ids, prompt_mask, tokens, mask, forced_experts=None) -> jax.Array:
    """``V [N, R]`` for every response position (0 where ``mask`` is off)."""
    hidden = response_hidden(model, prompt_ids, prompt_mask, tokens, mask, forced_experts).astype(jnp.float32)
    values = hidden @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)
    return jnp.where(mask, values, 0.0)


def token_level_rewards(seq_rewards, mask, token_penalty=None) -> jax.Array:
    """Sequence rewards placed on each response's last valid token, plus an optional per-token term
    (e.g. ``-kl_coef * KL_t`` for a KL penalty in the reward, as in PPO for RLHF)."""
    mask = jnp.asarray(mask, bool)
    length = mask.sum(axis=1)
    last = jnp.maximum(length - 1, 0)
    hot = (jnp.arange(mask.shape[1])[None, :] == last[:, None]) & (length[:, None] > 0)
    out = jnp.where(hot, jnp.asarray(seq_rewards, jnp.float32)[:, None], 0.0)
    if token_penalty is not None:
        out = out + jnp.where(mask, token_penalty, 0.0)
    return out


def make_critic_step(graphdef, optimizer: optax.GradientTransformation, *, value_clip: float | None):
    """``update(params, rest, opt_state, micro) -> (params, opt_state, metrics)``.

    ``params = {"trunk": <nnx Param state>, "head": {...}}``; ``micro`` is a dict of ``[num_micro, n, ...]`` arrays
    (``prompt_ids, prompt_mask, tokens, mask, old_values, returns``). The token-mean value loss uses the whole
    minibatch's token count as normaliser, so the summed micro-batch gradients are the minibatch gradient.
    """

    def loss_fn(params, rest, batch, normalizer):
        model = flax.nnx.merge(graphdef, params["trunk"], rest)
        values = token_values(model, params["head"], batch["prompt_ids"], batch["prompt_mask"], batch["tokens"],
                              batch["mask"])
        loss, metrics = L.value_loss(values, batch["old_values"], batch["returns"], batch["mask"], clip=value_clip,
                                     agg="token-mean", normalizer=normalizer)
        share = batch["mask"].sum() / normalizer  # a per-micro mean's weight in the minibatch's mean
        return loss, {"value_loss": Metric(loss, "sum"), **{k: Metric(v * share) for k, v in metrics.items()}}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, rest, opt_state, micro):
        normalizer = jnp.maximum(micro["mask"].sum(), 1).astype(jnp.float32)

        def micro_grads(batch):
            (_, metrics), grads = grad_fn(params, rest, batch, normalizer)
            return grads, metrics

        grads, metrics = accumulate(micro_grads, micro)
        grad_norm = optax.tree.norm(grads)
        new_params, new_opt_state = apply_if_finite(optimizer, grads, params, opt_state, jnp.isfinite(grad_norm))
        return new_params, new_opt_state, {**metrics, "value_grad_norm": grad_norm}

    return update


class Critic:
    """PPO's separate value model: a trunk initialised from the policy checkpoint (``trunk``, a fresh copy of the
    policy model), a zero value head, its own optimizer, and its jitted programs on ``layout``."""

    def __init__(self, trunk, optimizer: optax.GradientTransformation, layout, *, value_clip: float | None):
        from flax import nnx

        from jaxrl_llm.trainer.optim import init_opt_state

        self.graphdef, trunk_params, self.rest = nnx.split(trunk, nnx.Param, ...)
        self.layout = layout
        head = jax.device_put(init_value_head(trunk.cfg.hidden_size), layout.replicated())
        self.params = {"trunk": trunk_params, "head": head}
        self.opt_state = init_opt_state(optimizer, self.params, layout.replicated())
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        param_sh, opt_sh = shardings(self.params), shardings(self.opt_state)
        self._update = jax.jit(make_critic_step(self.graphdef, optimizer, value_clip=value_clip),
                               in_shardings=(param_sh, shardings(self.rest), opt_sh, None),
                               out_shardings=(param_sh, opt_sh, None), donate_argnums=(0, 2))
        graphdef = self.graphdef

        @jax.jit
        def values(params, rest, prompt_ids, prompt_mask, tokens, mask):
            model = flax.nnx.merge(graphdef, params["trunk"], rest)
            return token_values(model, params["head"], prompt_ids, prompt_mask, tokens, mask)

        self._values = values

    def values(self, ro) -> jax.Array:
        """``V [N, R]`` of a rollout's response tokens (0 where the mask is off)."""
        return self._values(self.params, self.rest, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)

    def update(self, batch: dict, num_micro: int) -> dict:
        """One optimizer update on ``batch`` (``prompt_ids, prompt_mask, tokens, mask, old_values, returns``, rows
        first) split into ``num_micro`` micro-batches."""
        micro = jax.device_put({k: v.reshape((num_micro, -1) + v.shape[1:]) for k, v in batch.items()},
                               self.layout.rows(axis=1))
        self.params, self.opt_state, metrics = self._update(self.params, self.rest, self.opt_state, micro)
        return metrics

    def state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def load_state(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
