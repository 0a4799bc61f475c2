"""The sampler's decode loop: one token per row per step over the KV cache, in stages of shrinking batch size.

Rows are the ``B * n`` rollout rows, prompt-major. Once at most half of a stage's rows still generate, those rows
move into a batch of half the size (:func:`compaction_sizes`): finished rows would otherwise cost as much per step
as active ones. Compaction is local to each of the batch's ``shards`` (the rows one data-parallel device holds):
rows never move between devices, and the smaller batches stay split like the first. Given a rollout's tokens
(teacher forcing), the same loop replays it: rows leave the batch at the same steps and round as they did.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from jaxrl_llm.losses import entropy_from_logits
from jaxrl_llm.models import KVCache
from jaxrl_llm.sampling.filters import SamplingParams, gumbel_noise, sample_tokens

__all__ = ["DecodeState", "RowLimits", "compaction_sizes", "decode_loop", "token_logprob"]


def token_logprob(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / temperature)[tokens]`` for ``logits [N, V]`` (shared by sampler and exact scorer)."""
    z = logits / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[:, None], axis=-1)[:, 0]


@flax.struct.dataclass
class DecodeState:
    """The decode loop's carry. Arrays over ``rows`` hold every rollout row; the cache and the logits hold only the
    rows of the current stage, listed by ``ids``."""

    t: jax.Array  # int32 scalar: the response position sampled next
    key: jax.Array  # PRNG key of the Gumbel noise after this step's
    cache: KVCache  # keys/values of the current rows
    logits: jax.Array  # float32 [current rows, V]: next-token logits of the current rows
    gumbel: jax.Array | None  # float32 [rows, V]: this step's Gumbel noise for every row (None when greedy)
    ids: jax.Array | None  # int32 [shards, size]: the current rows of each shard (None: every row, in order)
    tokens: jax.Array  # int32 [rows, R]: sampled tokens (0 after a row's end)
    logprobs: jax.Array  # float32 [rows, R]: their sampler log-probs (0 after a row's end)
    done: jax.Array  # bool [rows]: the row samples no more tokens
    stopped: jax.Array  # bool [rows]: the row ended on a stop token (not on its length budget)
    lengths: jax.Array  # int32 [rows]: tokens sampled so far
    experts: jax.Array | None  # int32 [L_moe, rows, P + R, k]: MoE routing of every input position
    # float32 [rows, R]: entropies of the distributions the tokens came from (teacher forcing only)
    entropies: jax.Array | None = None


class RowLimits(NamedTuple):
    """Per-row constants of a rollout (every ``[rows, ...]``)."""

    stop: jax.Array  # int32 [rows, K]: stop tokens (-1 unused)
    max_new: jax.Array  # int32 [rows]: length budgets
    prompt_len: jax.Array  # int32 [rows]: prompt lengths (position of the first response token)


def compaction_sizes(rows: int, compact_rows: int) -> tuple[int, ...]:
    """Batch sizes of the decode loop's stages: ``rows``, then halved while the half still holds ``compact_rows``.

    A stage runs until at most the next size's rows are still generating; those rows then move into a batch of
    that size (finished rows only cost time: each decode step costs about the same per row, finished or not).
    ``compact_rows=0`` keeps one stage.
    """
    sizes = [rows]
    while compact_rows and sizes[-1] % 2 == 0 and sizes[-1] // 2 >= compact_rows:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def rows_of(x: jax.Array, ids, shards: int) -> jax.Array:
    """The current rows ``[shards * size, ...]`` of a per-row array ``x [rows, ...]``."""
    if ids is None:
        return x
    blocks = x.reshape(shards, -1, *x.shape[1:])
    return jax.vmap(lambda xb, ib: xb[ib])(blocks, ids).reshape(-1, *x.shape[1:])


def put_rows(full: jax.Array, x: jax.Array, ids, shards: int, axis: int = 0) -> jax.Array:
    """``full`` (rows along ``axis``) with the current rows' values ``x`` written back."""
    if ids is None:
        return x
    full, x = jnp.moveaxis(full, axis, 0), jnp.moveaxis(x, axis, 0)
    blocks = full.reshape(shards, -1, *full.shape[1:])
    parts = x.reshape(shards, -1, *x.shape[1:])
    out = jax.vmap(lambda fb, ib, xb: fb.at[ib].set(xb))(blocks, ids, parts).reshape(full.shape)
    return jnp.moveaxis(out, 0, axis)


def initial_state(key, logits, cache: KVCache, experts, params: SamplingParams, forced=None) -> DecodeState:
    """The carry after the prefill (``logits [rows, V]`` predict every row's first response token); ``forced``
    (int32 ``[rows, R]``) teacher-forces these tokens instead of sampling (no noise, entropies recorded).

    Each step's Gumbel noise is drawn one step ahead: it does not depend on the logits, so drawing it overlaps the
    decode step instead of delaying the next token (on CPU the noise costs about as much as an attention layer).
    It is drawn for every row, also after compaction: a row's tokens do not depend on which rows share its batch.
    """
    rows, r = logits.shape[0], params.max_new_tokens
    zeros = jnp.zeros((rows, r), jnp.float32)
    gumbel = None
    if forced is None:
        key, sub = jax.random.split(key)
        gumbel = None if params.greedy else gumbel_noise(sub, logits.shape)
    return DecodeState(
        t=jnp.zeros((), jnp.int32), key=key, cache=cache, logits=logits, gumbel=gumbel, ids=None,
        tokens=jnp.zeros((rows, r), jnp.int32) if forced is None else forced, logprobs=zeros,
        done=jnp.zeros((rows,), bool), stopped=jnp.zeros((rows,), bool), lengths=jnp.zeros((rows,), jnp.int32),
        experts=experts, entropies=None if forced is None else zeros)


def _step(s: DecodeState, step_fn, params: SamplingParams, limits: RowLimits, prompt_width: int,
          shards: int) -> DecodeState:
    """Sample the current rows' tokens from their logits (teacher forcing: read them), record them, and feed them
    to ``step_fn(cache, tokens, positions) -> (logits, cache, routing)``."""
    t, ids = s.t, s.ids
    of = functools.partial(rows_of, ids=ids, shards=shards)
    put = functools.partial(put_rows, ids=ids, shards=shards)
    forced = s.entropies is not None
    if forced:
        tok = of(s.tokens[:, t])
    else:
        key, sub = jax.random.split(s.key)
        tok = sample_tokens(None, s.logits, params, gumbel=None if params.greedy else of(s.gumbel))
    logp = token_logprob(s.logits, tok, params.temperature)
    active = ~of(s.done)
    tok = jnp.where(active, tok, 0)
    is_stop = active & jnp.any(tok[:, None] == of(limits.stop), axis=1)
    lengths = of(s.lengths) + active
    done = ~active | is_stop | (lengths >= of(limits.max_new))
    logits, cache, routed = step_fn(s.cache, tok, of(limits.prompt_len) + t)
    stopped = of(s.stopped) | is_stop
    experts = s.experts
    if routed is not None and experts is not None:  # experts [layers, rows, P + R, k]
        experts = experts.at[:, :, prompt_width + t].set(put(experts[:, :, prompt_width + t], routed, axis=1))
    recorded = dict(t=t + 1, cache=cache, logits=logits,
                    logprobs=s.logprobs.at[:, t].set(put(s.logprobs[:, t], jnp.where(active, logp, 0.0))),
                    done=put(s.done, done), stopped=put(s.stopped, stopped), lengths=put(s.lengths, lengths))
    if forced:
        entropy = jnp.where(active, entropy_from_logits(s.logits / params.temperature), 0.0)
        return s.replace(entropies=s.entropies.at[:, t].set(put(s.entropies[:, t], entropy)), **recorded)
    return s.replace(
        key=key, gumbel=None if params.greedy else gumbel_noise(sub, (s.tokens.shape[0], logits.shape[-1])),
        tokens=s.tokens.at[:, t].set(put(s.tokens[:, t], tok)), experts=experts, **recorded)


def _compact(s: DecodeState, size: int, shards: int) -> DecodeState:
    """Each shard keeps its still-active rows: at most ``size`` of them, since the stage before ran until they
    were."""
    done = rows_of(s.done, s.ids, shards).reshape(shards, -1)
    keep = jnp.argsort(done.astype(jnp.int32), axis=1, stable=True)[:, :size]
    ids = keep if s.ids is None else jnp.take_along_axis(s.ids, keep, axis=1)
    return s.replace(ids=ids, logits=rows_of(s.logits, keep, shards),
                     cache=s.cache.map_batch(functools.partial(rows_of, ids=keep, shards=shards)))


def decode_loop(s: DecodeState, step_fn, params: SamplingParams, limits: RowLimits, *, prompt_width: int,
                shards: int = 1, compact_rows: int = 0) -> DecodeState:
    """Decode until every row is done or the budget is spent, compacting the batch in stages."""
    rows, r = s.tokens.shape
    sizes = compaction_sizes(rows // shards, -(-compact_rows // shards))  # per shard
    body = functools.partial(_step, step_fn=step_fn, params=params, limits=limits, prompt_width=prompt_width,
                             shards=shards)
    for stage, size in enumerate(sizes):
        if stage:
            s = _compact(s, size, shards)
        limit = sizes[stage + 1] if stage + 1 < len(sizes) else 0

        def cond(s: DecodeState, limit=limit):  # some shard still has more active rows than the next stage holds
            return (s.t < r) & (jnp.max(jnp.sum(~s.done.reshape(shards, -1), axis=1)) > limit)
        s = jax.lax.while_loop(cond, body, s)
    return s
