"""The jitted sampler: prefill + ``lax.while_loop`` decode over a fixed-size KV cache, on the trainer's model code.

Row layout: a batch of ``B`` left-padded prompts yields ``B * n`` rows, prompt-major (row ``i * n + j`` is sample
``j`` of prompt ``i``). The ``n`` samples of a prompt share one prefill: the prompt's cache is computed once and
repeated.

Reported log-probs: ``log softmax(logits / temperature)[token]``, the log-probability of the sampled token under
the temperature-scaled distribution *before* top-k/top-p/min-p truncation. This is the distribution the trainer
can reproduce (:func:`jaxrl_llm.sampling.score.sequence_logprobs` with the same temperature); with truncation the
actual sampling distribution is that one restricted to the kept tokens and renormalised, so the reported value
is lower than the truncated log-prob by the log of the kept probability mass.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.compile_options import compiler_options
from jaxrl_llm.distributed import host
from jaxrl_llm.losses import entropy_from_logits
from jaxrl_llm.models import Decoder, init_cache, left_pad_positions
from jaxrl_llm.sampling.filters import SamplingParams, gumbel_noise, sample_tokens

__all__ = ["Rollout", "Sampler", "FINISH_STOP", "FINISH_LENGTH"]

FINISH_STOP = 0
FINISH_LENGTH = 1


@flax.struct.dataclass
class Rollout:
    prompt_ids: jax.Array  # int32 [N, P] left-padded (repeated n times per prompt)
    prompt_mask: jax.Array  # bool [N, P]
    tokens: jax.Array  # int32 [N, R] sampled tokens (0 after the end)
    logprobs: jax.Array  # float32 [N, R] sampler log-probs (0 after the end)
    mask: jax.Array  # bool [N, R] response tokens, the stop token included
    lengths: jax.Array  # int32 [N]
    finish_reason: jax.Array  # int32 [N]: FINISH_STOP or FINISH_LENGTH
    experts: jax.Array | None = None  # int32 [L_moe, N, P + R, k] routing of every input position (MoE)
    n: int = flax.struct.field(pytree_node=False, default=1)


def token_logprob(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / temperature)[tokens]`` for ``logits [N, V]`` (shared by sampler and exact scorer)."""
    z = logits / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[:, None], axis=-1)[:, 0]


def prefill(model: Decoder, prompt_ids, prompt_mask, n: int, max_len: int, cache_dtype):
    """Run the prompts once, then repeat cache and next-token logits for the ``n`` samples of each prompt."""
    b = prompt_ids.shape[0]
    cache = init_cache(model.cfg, b, max_len, cache_dtype)
    out = model(prompt_ids, left_pad_positions(prompt_mask), attention_mask=prompt_mask, cache=cache)
    logits = model.logits(out.hidden[:, -1:])[:, 0]  # left padding: the last column is every row's last token
    rep = functools.partial(jnp.repeat, repeats=n, axis=0)
    cache = out.cache.map_batch(rep)
    experts = None if out.experts is None else jnp.repeat(out.experts, n, axis=1)
    return rep(logits), cache, experts


def decode_step(model: Decoder, cache, tokens, positions):
    """Feed one token per row; returns next-token logits [N, V] (fp32), the cache and the routing."""
    out = model(tokens[:, None], positions[:, None], cache=cache)
    experts = None if out.experts is None else out.experts[:, :, 0]
    return model.logits(out.hidden)[:, 0], out.cache, experts


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


def _batch_shards(prompt_ids: jax.Array) -> int:
    """Into how many equal blocks of rows the prompts' sharding splits the batch (1 when it is not split)."""
    b = prompt_ids.shape[0]
    per_shard = prompt_ids.sharding.shard_shape(prompt_ids.shape)[0]
    return b // per_shard if b % per_shard == 0 else 1


def _generate(graphdef, state, prompt_ids, prompt_mask, key, row_stop, row_max_new, *, params: SamplingParams,
              cache_dtype, compute_dtype, compact_rows: int = 0, shards: int = 1):
    if compute_dtype is not None:
        state = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                             state)
    model = nnx.merge(graphdef, state)
    n, r = params.n, params.max_new_tokens
    p = prompt_ids.shape[1]
    logits, cache, prompt_experts = prefill(model, prompt_ids, prompt_mask, n, p + r, cache_dtype)
    rows = logits.shape[0]
    prompt_len = jnp.repeat(prompt_mask.sum(axis=1).astype(jnp.int32), n)
    cfg = model.cfg
    experts = None
    if prompt_experts is not None:
        k = cfg.num_experts_per_tok
        # the last response token is never fed back; give it a fixed routing (its output is never used)
        experts = jnp.concatenate(
            [prompt_experts, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (cfg.num_moe_layers, rows, r, k))],
            axis=2)

    # each step's Gumbel noise is drawn one step ahead: it does not depend on the logits, so drawing it overlaps the
    # decode step instead of delaying the next token (on CPU the noise costs about as much as an attention layer).
    # It is drawn for every row, also after compaction: a row's tokens do not depend on which rows share its batch
    key, sub = jax.random.split(key)
    gumbel = None if params.greedy else gumbel_noise(sub, logits.shape)
    c = dict(
        t=jnp.zeros((), jnp.int32), key=key, cache=cache, logits=logits, gumbel=gumbel, ids=None,
        tokens=jnp.zeros((rows, r), jnp.int32), logprobs=jnp.zeros((rows, r), jnp.float32),
        done=jnp.zeros((rows,), bool), stopped=jnp.zeros((rows,), bool), lengths=jnp.zeros((rows,), jnp.int32),
        experts=experts,
    )

    # compaction is local to each of the batch's ``shards`` (the rows one data-parallel device holds): rows never
    # move between devices, and the smaller batches stay split like the first. ``ids [shards, per-shard size]``
    # holds each shard's current rows (None before the first compaction: all rows, in order)
    def rows_of(x, ids):  # x [rows, ...] -> the current rows [shards * size, ...]
        if ids is None:
            return x
        blocks = x.reshape(shards, -1, *x.shape[1:])
        return jax.vmap(lambda xb, ib: xb[ib])(blocks, ids).reshape(-1, *x.shape[1:])

    def put_rows(full, x, ids, axis=0):  # write the current rows' values back into ``full`` (rows along ``axis``)
        if ids is None:
            return x
        full, x = jnp.moveaxis(full, axis, 0), jnp.moveaxis(x, axis, 0)
        blocks = full.reshape(shards, -1, *full.shape[1:])
        parts = x.reshape(shards, -1, *x.shape[1:])
        out = jax.vmap(lambda fb, ib, xb: fb.at[ib].set(xb))(blocks, ids, parts).reshape(full.shape)
        return jnp.moveaxis(out, 0, axis)

    def body(c):
        # per-row arrays (outputs, flags, stops, noise) keep every row; cache and logits hold the current rows
        t, ids = c["t"], c["ids"]
        key, sub = jax.random.split(c["key"])
        tok = sample_tokens(None, c["logits"], params, gumbel=None if params.greedy else rows_of(c["gumbel"], ids))
        logp = token_logprob(c["logits"], tok, params.temperature)
        active = ~rows_of(c["done"], ids)
        tok = jnp.where(active, tok, 0)
        is_stop = active & jnp.any(tok[:, None] == rows_of(row_stop, ids), axis=1)
        lengths = rows_of(c["lengths"], ids) + active
        done = ~active | is_stop | (lengths >= rows_of(row_max_new, ids))
        new_logits, cache, routed = decode_step(model, c["cache"], tok, rows_of(prompt_len, ids) + t)
        stopped = rows_of(c["stopped"], ids) | is_stop
        out = dict(
            t=t + 1, key=key, cache=cache, logits=new_logits, ids=ids,
            gumbel=None if params.greedy else gumbel_noise(sub, (rows, new_logits.shape[-1])),
            tokens=c["tokens"].at[:, t].set(put_rows(c["tokens"][:, t], tok, ids)),
            logprobs=c["logprobs"].at[:, t].set(put_rows(c["logprobs"][:, t], jnp.where(active, logp, 0.0), ids)),
            done=put_rows(c["done"], done, ids), stopped=put_rows(c["stopped"], stopped, ids),
            lengths=put_rows(c["lengths"], lengths, ids),
            experts=c["experts"],
        )
        if routed is not None:  # experts [layers, rows, P + R, k]
            out["experts"] = c["experts"].at[:, :, p + t].set(put_rows(c["experts"][:, :, p + t], routed, ids, axis=1))
        return out

    sizes = compaction_sizes(rows // shards, -(-compact_rows // shards))  # per shard
    for stage, size in enumerate(sizes):
        if stage:  # each shard keeps its still-active rows (at most ``size``: the last loop ran until they were)
            done = rows_of(c["done"], c["ids"]).reshape(shards, -1)
            keep = jnp.argsort(done.astype(jnp.int32), axis=1, stable=True)[:, :size]
            ids = keep if c["ids"] is None else jnp.take_along_axis(c["ids"], keep, axis=1)
            c = dict(c, ids=ids, logits=rows_of(c["logits"], keep),
                     cache=c["cache"].map_batch(functools.partial(rows_of, ids=keep)))
        limit = sizes[stage + 1] if stage + 1 < len(sizes) else 0

        def cond(c, limit=limit):  # some shard still has more active rows than the next stage holds
            return (c["t"] < r) & (jnp.max(jnp.sum(~c["done"].reshape(shards, -1), axis=1)) > limit)
        c = jax.lax.while_loop(cond, body, c)
    mask = jnp.arange(r)[None, :] < c["lengths"][:, None]
    return Rollout(
        prompt_ids=jnp.repeat(prompt_ids, n, axis=0), prompt_mask=jnp.repeat(prompt_mask, n, axis=0),
        tokens=c["tokens"], logprobs=c["logprobs"], mask=mask, lengths=c["lengths"],
        finish_reason=jnp.where(c["stopped"], FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
        experts=c["experts"], n=n,
    )


def _score_exact(graphdef, state, prompt_ids, prompt_mask, tokens, mask, *, n: int, temperature: float,
                 cache_dtype, compute_dtype):
    """Teacher-force ``tokens`` through the sampler's own prefill and decode step (bitwise-equal log-probs)."""
    if compute_dtype is not None:
        state = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                             state)
    model = nnx.merge(graphdef, state)
    r = tokens.shape[1]
    logits, cache, _ = prefill(model, prompt_ids, prompt_mask, n, prompt_ids.shape[1] + r, cache_dtype)
    prompt_len = jnp.repeat(prompt_mask.sum(axis=1).astype(jnp.int32), n)

    def step(carry, xs):
        cache, logits = carry
        t, tok = xs
        logp = token_logprob(logits, tok, temperature)
        ent = entropy_from_logits(logits / temperature)
        logits, cache, _ = decode_step(model, cache, tok, prompt_len + t)
        return (cache, logits), (logp, ent)

    # unrolled: a step's log-prob and entropy do not wait for its decode step, and several steps per iteration let
    # XLA run them alongside the next decode steps. The unroll must divide the step count: the remainder steps of
    # an uneven unroll compile separately, and their attention rounds differently from the sampler's
    # (tests/test_sampling.py checks bitwise equality for dense and MoE models with unrolls of 1, 2 and 4)
    unroll = 4 if r % 4 == 0 else 2 if r % 2 == 0 else 1
    _, (logp, ent) = jax.lax.scan(step, (cache, logits), (jnp.arange(r), tokens.T), unroll=unroll)
    return jnp.where(mask, logp.T, 0.0), jnp.where(mask, ent.T, 0.0)


class Sampler:
    """Samples from a :class:`Decoder` given its graph definition and (changing) parameter state.

    Args:
      model: the policy (only its structure is kept; pass the current state to :meth:`generate`).
      consistency: ``"default"`` (sampler and :func:`score` agree to ~1e-6 in fp32) or ``"exact"`` (the scorer
        replays the sampler's own prefill/decode computation, so log-probs are bitwise equal; it needs the same
        rows, padding and ``n`` as the rollout).
      compute_dtype: sample in another precision than the model's (e.g. ``jnp.bfloat16`` with an fp32 trainer).
      compact_rows: once at most half of the decode batch is still generating, those rows move into a batch of
        half the size, down to ``compact_rows`` rows (default 8; ``0`` turns compaction off). Finished rows
        otherwise cost as much per step as active ones. With the prompts sharded by rows, each shard compacts its
        own rows (nothing moves between devices). Rows in a smaller batch round slightly differently (about 1e-7
        in the logits), so ``exact`` mode, whose scorer replays the full batch, does not compact.
    """

    CONSISTENCY_MODES = ("default", "exact")

    DEFAULT_COMPACT_ROWS = 8

    def __init__(self, model: Decoder, *, consistency: str = "default", compute_dtype=None, cache_dtype=None,
                 compact_rows: int | None = None):
        if consistency not in self.CONSISTENCY_MODES:
            raise ValueError(f"consistency must be one of {self.CONSISTENCY_MODES}, got {consistency!r}")
        if compact_rows is None:
            compact_rows = 0 if consistency == "exact" else self.DEFAULT_COMPACT_ROWS
        if compact_rows < 0 or (compact_rows and consistency == "exact"):
            raise ValueError(f"compact_rows must be >= 0, and 0 with consistency='exact' (its scorer replays the "
                             f"full batch); got {compact_rows}")
        self.consistency = consistency
        self.compact_rows = int(compact_rows)
        self.cfg = model.cfg
        if consistency == "exact" and compute_dtype is not None and compute_dtype != model.dtype:
            raise ValueError("consistency='exact' needs the sampler to run in the model's own precision; "
                             "drop compute_dtype or use consistency='default'")
        attention = model.attention  # the prefill runs the policy's attention kernel; decoding reads filled blocks
        if compute_dtype is not None and compute_dtype != model.dtype:
            cfg = model.cfg
            model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=compute_dtype,
                                                   param_dtype=compute_dtype, attention=attention))
        else:
            compute_dtype = None
            if model.remat != "none":  # sampling takes no gradient: its model rematerialises nothing
                cfg, dtype, param_dtype = model.cfg, model.dtype, model.embed.get_value().dtype
                model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                       attention=attention))
        self.compute_dtype = compute_dtype
        self.graphdef = nnx.graphdef(model)
        self.cache_dtype = cache_dtype or compute_dtype or model.dtype
        # both programs compile with the same options: exact mode needs the scorer's decode steps to be the sampler's
        options = compiler_options()
        self._generate = jax.jit(_generate, static_argnums=(0,),
                                 static_argnames=("params", "cache_dtype", "compute_dtype", "compact_rows", "shards"),
                                 compiler_options=options)
        self._score_exact = jax.jit(_score_exact, static_argnums=(0,),
                                    static_argnames=("n", "temperature", "cache_dtype", "compute_dtype"),
                                    compiler_options=options)

    def _generate_args(self, state, prompt_ids, prompt_mask, params: SamplingParams, key, stop_tokens,
                       max_new_tokens):
        """Checks the inputs; the jitted sampler's positional and keyword arguments."""
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        prompt_mask = jnp.asarray(prompt_mask, bool)
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(f"prompt_ids and prompt_mask must both be [batch, prompt_len]; got "
                             f"{prompt_ids.shape} and {prompt_mask.shape}")
        b, p = prompt_ids.shape
        if b == 0 or p == 0:
            raise ValueError("empty batch of prompts")
        lengths = host(prompt_mask.sum(axis=1))  # gathered when the rows span processes
        if (lengths == 0).any():
            raise ValueError(f"empty prompt at row(s) {[int(i) for i in (lengths == 0).nonzero()[0]]}")
        if not bool(jax.device_get(prompt_mask[:, -1].all())):
            raise ValueError("prompts must be left-padded: the last column must hold a real token in every row")
        if p + params.max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt length {p} + max_new_tokens {params.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings {self.cfg.max_position_embeddings}")
        n = params.n
        stops = list(params.stop_tokens)
        row_stop = jnp.full((b, max(len(stops), 1)), -1, jnp.int32)
        if stops:
            row_stop = row_stop.at[:, :len(stops)].set(jnp.asarray(stops, jnp.int32))
        if stop_tokens is not None:
            row_stop = jnp.concatenate([row_stop, jnp.asarray(stop_tokens, jnp.int32).reshape(b, -1)], axis=1)
        row_max = jnp.full((b,), params.max_new_tokens, jnp.int32)
        if max_new_tokens is not None:
            row_max = jnp.minimum(row_max, jnp.asarray(max_new_tokens, jnp.int32))
        args = (self.graphdef, state, prompt_ids, prompt_mask, key, jnp.repeat(row_stop, n, axis=0),
                jnp.repeat(row_max, n))
        options = dict(params=params, cache_dtype=self.cache_dtype, compute_dtype=self.compute_dtype,
                       compact_rows=self.compact_rows, shards=_batch_shards(prompt_ids))
        return args, options

    def generate(self, state, prompt_ids, prompt_mask, params: SamplingParams, key, *, stop_tokens=None,
                 max_new_tokens=None) -> Rollout:
        """Sample ``params.n`` continuations of each left-padded prompt.

        ``stop_tokens`` (int ``[B, K]``, -1 = unused) and ``max_new_tokens`` (int ``[B]``) set per-prompt stops and
        budgets on top of ``params.stop_tokens`` / ``params.max_new_tokens``.
        """
        args, options = self._generate_args(state, prompt_ids, prompt_mask, params, key, stop_tokens, max_new_tokens)
        return self._generate(*args, **options)

    def lower(self, state, prompt_ids, prompt_mask, params: SamplingParams, key, *, stop_tokens=None,
              max_new_tokens=None) -> jax.stages.Lowered:
        """The program :meth:`generate` runs for these arguments, lowered (``.compile().as_text()`` shows what XLA
        made of it)."""
        args, options = self._generate_args(state, prompt_ids, prompt_mask, params, key, stop_tokens, max_new_tokens)
        return self._generate.lower(*args, **options)

    def score_exact(self, state, rollout: Rollout, temperature: float):
        """Bitwise-consistent per-token (log-prob, entropy) of the rollout's tokens (``exact`` mode)."""
        n = rollout.n
        return self._score_exact(self.graphdef, state, rollout.prompt_ids[::n], rollout.prompt_mask[::n],
                                 rollout.tokens, rollout.mask, n=n, temperature=float(temperature),
                                 cache_dtype=self.cache_dtype, compute_dtype=self.compute_dtype)
