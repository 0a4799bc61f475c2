"""Trainer-side scoring: per-token log-probs and entropies of given response tokens.

:func:`sequence_logprobs` is a pure, differentiable function of the model: the trainer uses it for the
current policy inside the loss, and (jitted, through :func:`score`) for old and reference log-probs. It runs
one full forward over ``[prompt | response]`` and the chunked log-prob kernel, so ``[B, T, V]`` logits are never
materialised.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.compile_options import compiler_options
from jaxrl_llm.losses import token_logprobs_and_entropy
from jaxrl_llm.models import init_cache, left_pad_positions
from jaxrl_llm.parallel import active_row_ways, constrain_rows, constrain_unembedding

__all__ = ["response_hidden", "sequence_logprobs", "score", "rollout_logprobs", "rollout_logprobs_program",
           "layer_entropies",
           "routing_agreement"]


def _forward(model, prompt_ids, prompt_mask, tokens, mask, **kwargs):
    ids = jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1).astype(bool)
    return model(ids, left_pad_positions(full_mask), attention_mask=full_mask, **kwargs), full_mask


def response_hidden(model, prompt_ids, prompt_mask, tokens, mask, forced_experts=None, layer: int | None = None,
                    group: int = 1):
    """Final hidden states ``[N, R, H]`` that predict each response token: one forward over ``[prompt | response]``.

    The hidden state at position i predicts token i + 1, so response token t is predicted at ``P - 1 + t``.
    With ``layer = l`` the states are layer l's residual stream (0-based) through the final norm: the read-out
    of an internal layer policy (logit lens). Layers above l then take no part in the result.

    ``group = n > 1`` says every run of ``n`` consecutive rows shares one prompt (the ``n`` samples of a prompt):
    each prompt is then run once, its keys and values are repeated for its rows and only the responses are run
    on top (:func:`_shared_prompt_hidden`); mathematically the same states, with the prompt's share of the
    arithmetic (and of the backward pass) divided by ``n``.
    """
    if group > 1:
        if layer is not None:
            raise ValueError("group > 1 (shared prompts) cannot read out an internal layer")
        return _shared_prompt_hidden(model, prompt_ids, prompt_mask, tokens, mask, forced_experts, group)
    p = prompt_ids.shape[1]
    out, _ = _forward(model, prompt_ids, prompt_mask, tokens, mask, forced_experts=forced_experts,
                      return_residuals=layer is not None)
    hidden = out.hidden if layer is None else model.final_norm(out.residuals[layer + 1])
    return hidden[:, p - 1:-1]


def _shared_prompt_hidden(model, prompt_ids, prompt_mask, tokens, mask, forced_experts, n: int):
    p = prompt_ids.shape[1]
    r = tokens.shape[1]
    out, prompt_len = _prefill_groups(model, prompt_ids, prompt_mask, forced_experts, n, r)
    repeat = functools.partial(jnp.repeat, repeats=n, axis=0)
    positions = repeat(prompt_len)[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]
    resp = model(tokens.astype(jnp.int32), positions, attention_mask=mask,
                 cache=out.cache.map_batch(repeat).with_slots(p + r),
                 forced_experts=None if forced_experts is None else forced_experts[:, :, p:])
    # left padding: the prompt's last column is every row's last prompt token, which predicts response token 0
    return jnp.concatenate([repeat(out.hidden[:, -1:]), resp.hidden[:, :-1]], axis=1)


def _prefill_groups(model, prompt_ids, prompt_mask, forced_experts, n: int, slots: int):
    """Run each group's prompt once: ``(output, prompt lengths)``; the output's cache holds the prompts' slots
    (:meth:`KVCache.with_slots` adds the ``slots`` free ones once rows are repeated)."""
    rows, p = prompt_ids.shape
    if rows % n:
        raise ValueError(f"{rows} rows do not form groups of {n} samples sharing a prompt")
    prompts, prompt_masks = prompt_ids[::n], prompt_mask[::n]
    fe_prompt = None if forced_experts is None else forced_experts[:, ::n, :p]  # a prompt is routed once
    cache = init_cache(model.cfg, rows // n, p, model.dtype)
    out = model(prompts, left_pad_positions(prompt_masks), attention_mask=prompt_masks, cache=cache,
                forced_experts=fe_prompt)
    return out, prompt_masks.sum(axis=1).astype(jnp.int32)


def token_stats(hidden, unembedding, tokens, *, chunk: int, temperature: float):
    """``(logp, entropy)`` of ``tokens`` read out of ``hidden`` by the ``[embed, vocab]`` unembedding, each device
    computing the logits of its own rows only when traced on a mesh (see :func:`token_logprobs_and_entropy`)."""
    return token_logprobs_and_entropy(hidden, constrain_unembedding(unembedding), tokens, chunk=chunk,
                                      temperature=temperature, row_blocks=active_row_ways(),
                                      place_rows=functools.partial(constrain_rows, only_rows=True))


def _packed_logprobs(model, prompt_ids, prompt_mask, tokens, mask, forced_experts, n, packing, temperature, chunk):
    """Log-probs and entropies through a packed layout (:mod:`jaxrl_llm.trainer.packing`): each packed row holds
    responses of one group, as segments continuing the group's prompt."""
    rows, p = prompt_ids.shape
    r = tokens.shape[1]
    out, prompt_len = _prefill_groups(model, prompt_ids, prompt_mask, forced_experts, n, r)
    fe = None
    if forced_experts is not None:
        layers, _, _, k = forced_experts.shape
        fe = forced_experts[:, :, p:].reshape(layers, rows * r, k)[:, packing.src]
    packed = tokens.reshape(-1)[packing.src]
    resp = model(packed, prompt_len[packing.group][:, None] + packing.offset, segment_ids=packing.segment,
                 cache=out.cache.map_batch(lambda x: x[packing.group]).with_slots(p + r), forced_experts=fe)
    # a segment's first token is predicted by its prompt's last state (left padding: the last column), the others
    # by the previous slot
    last = out.hidden[:, -1][packing.group][:, None]
    previous = jnp.concatenate([last, resp.hidden[:, :-1]], axis=1)
    hidden = jnp.where((packing.offset == 0)[..., None], last, previous)
    logp, ent = token_stats(hidden, model.unembedding(), packed, chunk=chunk, temperature=temperature)
    logp, ent = logp.reshape(-1)[packing.back], ent.reshape(-1)[packing.back]
    return jnp.where(mask, logp, 0.0), jnp.where(mask, ent, 0.0)


def sequence_logprobs(model, prompt_ids, prompt_mask, tokens, mask, *, temperature: float = 1.0, chunk: int = 512,
                      forced_experts=None, layer: int | None = None, group: int = 1, packing=None):
    """``(logp [N, R], entropy [N, R])`` of response ``tokens`` after left-padded prompts; 0 where ``mask`` is off.

    ``temperature`` must be the sampling temperature so values match the sampler's. ``forced_experts``
    (``[L_moe, N, P + R, k]``) replays a recorded MoE routing. ``layer`` scores the internal policy of that layer
    (see :func:`response_hidden`). ``group = n`` runs each prompt once for its ``n`` consecutive rows;
    ``packing`` (a :class:`jaxrl_llm.trainer.packing.Packing` for these rows, with ``group``) also packs the
    responses of each group into fewer rows.
    """
    if packing is not None:
        if group < 2 or layer is not None:
            raise ValueError("packing needs group > 1 (shared prompts) and no internal-layer read-out")
        return _packed_logprobs(model, prompt_ids, prompt_mask, tokens, mask, forced_experts, group, packing,
                                temperature, chunk)
    hidden = response_hidden(model, prompt_ids, prompt_mask, tokens, mask, forced_experts, layer, group)
    logp, ent = token_stats(hidden, model.unembedding(), tokens, chunk=chunk, temperature=temperature)
    return jnp.where(mask, logp, 0.0), jnp.where(mask, ent, 0.0)


def _score(graphdef, state, prompt_ids, prompt_mask, tokens, mask, forced_experts, *, temperature, chunk, layer,
           group):
    model = nnx.merge(graphdef, state)
    return sequence_logprobs(model, prompt_ids, prompt_mask, tokens, mask, temperature=temperature, chunk=chunk,
                             forced_experts=forced_experts, layer=layer, group=group)


@functools.cache
def _jitted_score():
    # compiled like the sampler (made on first use: the options depend on the backend)
    return jax.jit(_score, static_argnums=(0,), static_argnames=("temperature", "chunk", "layer", "group"),
                   compiler_options=compiler_options())


def score(graphdef, state, prompt_ids, prompt_mask, tokens, mask, *, temperature: float = 1.0, chunk: int = 512,
          forced_experts=None, layer: int | None = None, group: int = 1):
    """Jitted :func:`sequence_logprobs` for a model given as ``(graphdef, state)`` (no gradient)."""
    return _jitted_score()(graphdef, state, prompt_ids, prompt_mask, tokens, mask, forced_experts,
                           temperature=float(temperature), chunk=chunk, layer=layer, group=group)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("temperature", "chunk"))
def layer_entropies(graphdef, state, prompt_ids, prompt_mask, tokens, mask, *, temperature: float = 1.0,
                    chunk: int = 512):
    """Mean entropy ``[num_layers]`` of every layer's read-out policy (final norm + unembedding applied to the
    residual stream after that layer) over the valid response positions; the last entry is the model's own."""
    model = nnx.merge(graphdef, state)
    p = prompt_ids.shape[1]
    out, _ = _forward(model, prompt_ids, prompt_mask, tokens, mask, return_residuals=True)
    count = jnp.maximum(mask.sum(), 1)

    def one(residual):
        hidden = model.final_norm(residual)[:, p - 1:-1]
        _, ent = token_stats(hidden, model.unembedding(), tokens, chunk=chunk, temperature=temperature)
        return jnp.sum(jnp.where(mask, ent, 0.0)) / count

    return jax.lax.map(one, out.residuals[1:])


@functools.partial(jax.jit, static_argnums=(0,))
def routing_agreement(graphdef, state, prompt_ids, prompt_mask, tokens, mask, experts):
    """Fraction of recorded expert choices ``experts [L_moe, N, P + R, k]`` (e.g. the sampler's) that the model
    ``(graphdef, state)`` also makes when it routes by itself, over every valid position and MoE layer."""
    model = nnx.merge(graphdef, state)
    out, full_mask = _forward(model, prompt_ids, prompt_mask, tokens, mask)
    own = out.experts  # [L_moe, N, T, k]
    hit = jnp.any(experts[..., :, None] == own[..., None, :], axis=-1)  # [L_moe, N, T, k]
    valid = jnp.broadcast_to(full_mask[None, :, :, None], hit.shape)
    return jnp.sum(hit & valid) / jnp.maximum(valid.sum(), 1)


def rollout_logprobs_program(sampler, graphdef, state, rollout, *, temperature: float, chunk: int = 512,
                             forced_experts=None, group: int = 1):
    """``(jitted function, args, kwargs)`` that :func:`rollout_logprobs` runs (arrays may be abstract, to lower the
    program ahead of time)."""
    if sampler.consistency == "exact":
        return sampler.score_exact_program(state, rollout, temperature)
    return score_program(graphdef, state, rollout, temperature=temperature, chunk=chunk,
                         forced_experts=forced_experts, group=group)


def score_program(graphdef, state, rollout, *, temperature: float, chunk: int = 512, forced_experts=None,
                  group: int = 1):
    """``(jitted function, args, kwargs)`` of :func:`score` over a rollout's tokens (arrays may be abstract)."""
    args = (graphdef, state, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask, forced_experts)
    return _jitted_score(), args, dict(temperature=float(temperature), chunk=chunk, layer=None, group=group)


def rollout_logprobs(sampler, graphdef, state, rollout, *, temperature: float, chunk: int = 512,
                     forced_experts=None, group: int = 1):
    """Trainer log-probs (and entropies) of a rollout's tokens under the model ``(graphdef, state)``.

    In the sampler's ``exact`` mode they are recomputed through the sampler's own prefill/decode path and equal
    the rollout's log-probs bit for bit; otherwise one full forward (:func:`score`; ``group = rollout.n`` runs
    each prompt once).
    """
    fn, args, kwargs = rollout_logprobs_program(sampler, graphdef, state, rollout, temperature=temperature,
                                                chunk=chunk, forced_experts=forced_experts, group=group)
    return fn(*args, **kwargs)
