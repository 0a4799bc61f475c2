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
from jaxrl_llm.models.attention import static_decode_blocks
from jaxrl_llm.parallel import active_row_ways, constrain_unembedding
from jaxrl_llm.sampling.decode import RowLimits, decode_loop, initial_state, token_logprob
from jaxrl_llm.sampling.filters import SamplingParams
from jaxrl_llm.sampling.score import sequence_logprobs

__all__ = ["Rollout", "Sampler", "FINISH_STOP", "FINISH_LENGTH", "decode_logprobs", "scanned_decode_logprobs",
           "teacher_forced_logprobs", "values_with_gradient"]

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


def prefill(model: Decoder, prompt_ids, prompt_mask, n: int, max_len: int, cache_dtype):
    """Run the prompts once, then repeat cache and next-token logits for the ``n`` samples of each prompt."""
    b, p = prompt_ids.shape
    cache = init_cache(model.cfg, b, p, cache_dtype)  # the prompts' slots; the rest once rows are repeated
    out = model(prompt_ids, left_pad_positions(prompt_mask), attention_mask=prompt_mask, cache=cache)
    logits = model.logits(out.hidden[:, -1:])[:, 0]  # left padding: the last column is every row's last token
    rep = functools.partial(jnp.repeat, repeats=n, axis=0)
    cache = out.cache.map_batch(rep).with_slots(max_len)
    experts = None if out.experts is None else jnp.repeat(out.experts, n, axis=1)
    return rep(logits), cache, experts


def decode_step(model: Decoder, cache, tokens, positions):
    """Feed one token per row; returns next-token logits [N, V] (fp32), the cache and the routing."""
    out = model(tokens[:, None], positions[:, None], cache=cache)
    experts = None if out.experts is None else out.experts[:, :, 0]
    return model.logits(out.hidden)[:, 0], out.cache, experts


def _batch_shards(prompt_ids: jax.Array, n: int) -> int:
    """Into how many equal blocks of rows the decode batch is split: the mesh's row ways when tracing on a mesh
    that divides the ``b * n`` rows (few prompts may not divide, their samples do), else the prompts' sharding's
    (1 when it is not split). Compaction then never makes a batch the devices cannot share."""
    b = prompt_ids.shape[0]
    ways = active_row_ways()
    if ways > 1 and (b * n) % ways == 0:
        return ways
    per_shard = prompt_ids.sharding.shard_shape(prompt_ids.shape)[0]
    return b // per_shard if b % per_shard == 0 else 1


def _cast(state, compute_dtype):
    """The weights in the sampler's precision (floating leaves only)."""
    if compute_dtype is None:
        return state
    return jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def _sampling_model(graphdef, state, compute_dtype) -> Decoder:
    """The policy as the sampler runs it: in its precision, with the unembedding gathered over ``embed`` once.
    Every decode step multiplies by the whole unembedding; left to XLA, the prefill and each decode loop gather
    their own copy before the loop starts, and the copies live side by side."""
    model = nnx.merge(graphdef, _cast(state, compute_dtype))
    if model.cfg.tie_word_embeddings:
        model.embed[...] = constrain_unembedding(model.embed[...].T).T
    else:
        model.lm_head[...] = constrain_unembedding(model.lm_head[...])
    return model


def _generate(graphdef, state, prompt_ids, prompt_mask, key, row_stop, row_max_new, *, params: SamplingParams,
              cache_dtype, compute_dtype, compact_rows: int = 0, shards: int = 1, exact: bool = False):
    # exact mode's decode steps are those of its update's decode pass (attention.static_decode_blocks)
    with static_decode_blocks(exact):
        return _generate_rows(graphdef, state, prompt_ids, prompt_mask, key, row_stop, row_max_new, params=params,
                              cache_dtype=cache_dtype, compute_dtype=compute_dtype, compact_rows=compact_rows,
                              shards=shards)


def _generate_rows(graphdef, state, prompt_ids, prompt_mask, key, row_stop, row_max_new, *, params: SamplingParams,
                   cache_dtype, compute_dtype, compact_rows: int, shards: int):
    model = _sampling_model(graphdef, state, compute_dtype)
    n, r = params.n, params.max_new_tokens
    p = prompt_ids.shape[1]
    logits, cache, prompt_experts = prefill(model, prompt_ids, prompt_mask, n, p + r, cache_dtype)
    rows = logits.shape[0]
    experts = None
    if prompt_experts is not None:
        cfg, k = model.cfg, model.cfg.num_experts_per_tok
        # the last response token is never fed back; give it a fixed routing (its output is never used)
        experts = jnp.concatenate(
            [prompt_experts, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (cfg.num_moe_layers, rows, r, k))],
            axis=2)
    limits = RowLimits(stop=row_stop, max_new=row_max_new,
                       prompt_len=jnp.repeat(prompt_mask.sum(axis=1).astype(jnp.int32), n))
    s = initial_state(key, logits, cache, experts, params)
    s = decode_loop(s, functools.partial(decode_step, model), params, limits, prompt_width=p, shards=shards,
                    compact_rows=compact_rows)
    mask = jnp.arange(r)[None, :] < s.lengths[:, None]
    return Rollout(
        prompt_ids=jnp.repeat(prompt_ids, n, axis=0), prompt_mask=jnp.repeat(prompt_mask, n, axis=0),
        tokens=s.tokens, logprobs=s.logprobs, mask=mask, lengths=s.lengths,
        finish_reason=jnp.where(s.stopped, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
        experts=s.experts, n=n,
    )


def teacher_forced_logprobs(graphdef, state, prompt_ids, prompt_mask, tokens, mask, lengths, *, n: int,
                            temperature: float, cache_dtype, compute_dtype=None, compact_rows: int = 0,
                            shards: int = 1):
    """Per-token (log-prob, entropy) of ``tokens`` (0 where ``mask`` is off) from the sampler's own prefill and
    decode loop with the tokens forced instead of sampled: bitwise the sampler's log-probs for the rows as it
    returned them (prompts in groups of ``n`` equal ones, response ``lengths``), given the sampler's
    ``compact_rows`` and ``shards``. Rows leave the decode batch at the steps they left it in the sampler, so each
    row rounds as it did there."""
    with static_decode_blocks():
        model = _sampling_model(graphdef, state, compute_dtype)
        prompt_ids, prompt_mask = prompt_ids[::n], prompt_mask[::n]
        rows, r = tokens.shape
        p = prompt_ids.shape[1]
        logits, cache, _ = prefill(model, prompt_ids, prompt_mask, n, p + r, cache_dtype)
        # the recorded lengths end every row where the sampler ended it (stop token or budget)
        limits = RowLimits(stop=jnp.full((rows, 1), -1, jnp.int32), max_new=lengths.astype(jnp.int32),
                           prompt_len=jnp.repeat(prompt_mask.sum(axis=1).astype(jnp.int32), n))
        params = SamplingParams(temperature=temperature, max_new_tokens=r, n=n)
        s = initial_state(None, logits, cache, None, params, forced=tokens)
        s = decode_loop(s, functools.partial(decode_step, model), params, limits, prompt_width=p, shards=shards,
                        compact_rows=compact_rows)
    return jnp.where(mask, s.logprobs, 0.0), jnp.where(mask, s.entropies, 0.0)


def scanned_decode_logprobs(graphdef, state, prompt_ids, prompt_mask, tokens, mask, *, n: int, temperature: float,
                            cache_dtype):
    """:func:`teacher_forced_logprobs` as a ``lax.scan`` of decode steps over the whole response (no compaction):
    a loop reverse mode can differentiate, for checking the gradient exact mode takes against the decode loop's
    own. Under differentiation its values round apart from the sampler's (``experiments/exact_probe.py``)."""
    model = nnx.merge(graphdef, state)
    prompt_ids, prompt_mask = prompt_ids[::n], prompt_mask[::n]
    r = tokens.shape[1]
    prompt_len = jnp.repeat(prompt_mask.sum(axis=1).astype(jnp.int32), n)

    def step(carry, xs):
        cache, logits = carry
        t, tok = xs
        out = (token_logprob(logits, tok, temperature), entropy_from_logits(logits / temperature))
        logits, cache, _ = decode_step(model, cache, tok, prompt_len + t)
        return (cache, logits), out

    with static_decode_blocks():
        logits, cache, _ = prefill(model, prompt_ids, prompt_mask, n, prompt_ids.shape[1] + r, cache_dtype)
        _, (logp, ent) = jax.lax.scan(step, (cache, logits), (jnp.arange(r), tokens.T))
    return jnp.where(mask, logp.T, 0.0), jnp.where(mask, ent.T, 0.0)


def values_with_gradient(values, fn, *args):
    """``values`` (a pytree shaped like ``fn(*args)``: the same function of ``args`` computed another way) with
    the gradient of ``fn``: under differentiation, the cotangents of ``values`` flow back through ``fn``'s
    vector-Jacobian product at ``args``. No gradient flows through ``values`` themselves."""

    @jax.custom_vjp
    def run(values, args):
        return values

    def run_fwd(values, args):
        return values, args

    def run_bwd(args, cotangents):
        return jax.tree.map(jnp.zeros_like, cotangents), jax.vjp(fn, *args)[1](cotangents)

    run.defvjp(run_fwd, run_bwd)
    return run(jax.lax.stop_gradient(values), args)


def decode_logprobs(graphdef, state, prompt_ids, prompt_mask, tokens, mask, lengths, *, n: int, temperature: float,
                    cache_dtype, compute_dtype=None, compact_rows: int = 0, shards: int = 1):
    """Differentiable per-token (log-prob, entropy) of ``tokens`` whose values are computed by the sampler's own
    prefill and decode step (``exact`` mode's values): for the sampler's weights and batch they are the sampler's
    log-probs bit for bit (given its ``compact_rows`` and ``shards``, as :func:`teacher_forced_logprobs`).

    The gradient is that of the full-sequence forward (:func:`jaxrl_llm.sampling.score.sequence_logprobs`, each
    prompt run once for its ``n`` rows): the same function of the weights, computed in parallel over positions
    (:func:`values_with_gradient`). Differentiating the decode loop itself would also change its values: XLA
    compiles a loop that emits residuals differently, and a few log-probs round apart from the sampler's
    (``experiments/exact_probe.py``)."""
    values = teacher_forced_logprobs(graphdef, jax.lax.stop_gradient(state), prompt_ids, prompt_mask, tokens, mask,
                                     lengths, n=n, temperature=temperature, cache_dtype=cache_dtype,
                                     compute_dtype=compute_dtype, compact_rows=compact_rows, shards=shards)

    def full_forward(state, prompt_ids, prompt_mask, tokens, mask):
        return sequence_logprobs(_sampling_model(graphdef, state, compute_dtype), prompt_ids, prompt_mask, tokens,
                                 mask, temperature=temperature, group=n)

    return values_with_gradient(values, full_forward, state, prompt_ids, prompt_mask, tokens, mask)


def _check_prompts(prompt_ids, prompt_mask) -> None:
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


class Sampler:
    """Samples from a :class:`Decoder` given its graph definition and (changing) parameter state.

    Args:
      model: the policy (only its structure is kept; pass the current state to :meth:`generate`).
      consistency: ``"default"`` (sampler and :func:`score` agree to ~1e-6 in fp32) or ``"exact"`` (decode steps
        that :func:`teacher_forced_logprobs` reproduces; it and :meth:`score_exact` recompute the sampler's
        log-probs bit for bit from the same rows, padding and ``n`` as the rollout).
      compute_dtype: sample in another precision than the model's (e.g. ``jnp.bfloat16`` with an fp32 trainer).
      compact_rows: once at most half of the decode batch is still generating, those rows move into a batch of
        half the size, down to ``compact_rows`` rows (default 8; ``0`` turns compaction off). Finished rows
        otherwise cost as much per step as active ones. With the prompts sharded by rows, each shard compacts its
        own rows (nothing moves between devices). Rows in a smaller batch round slightly differently (about 1e-7
        in the logits): :func:`teacher_forced_logprobs` compacts at the same steps.
    """

    CONSISTENCY_MODES = ("default", "exact")

    DEFAULT_COMPACT_ROWS = 8

    def __init__(self, model: Decoder, *, consistency: str = "default", compute_dtype=None, cache_dtype=None,
                 compact_rows: int | None = None):
        if consistency not in self.CONSISTENCY_MODES:
            raise ValueError(f"consistency must be one of {self.CONSISTENCY_MODES}, got {consistency!r}")
        if compact_rows is None:
            compact_rows = self.DEFAULT_COMPACT_ROWS
        if compact_rows < 0:
            raise ValueError(f"compact_rows must be >= 0, got {compact_rows}")
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
                                 static_argnames=("params", "cache_dtype", "compute_dtype", "compact_rows", "shards",
                                                  "exact"),
                                 compiler_options=options)
        self._score_exact = jax.jit(teacher_forced_logprobs, static_argnums=(0,),
                                    static_argnames=("n", "temperature", "cache_dtype", "compute_dtype",
                                                     "compact_rows", "shards"),
                                    compiler_options=options)

    def _generate_args(self, state, prompt_ids, prompt_mask, params: SamplingParams, key, stop_tokens,
                       max_new_tokens):
        """Checks the inputs; the jitted sampler's positional and keyword arguments. Prompts given as
        ``jax.ShapeDtypeStruct`` (to lower the program ahead of time) are checked for their shapes only."""
        if not isinstance(prompt_ids, jax.ShapeDtypeStruct):
            prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, bool)
            _check_prompts(prompt_ids, prompt_mask)
        b, p = prompt_ids.shape
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
                       compact_rows=self.compact_rows, shards=_batch_shards(prompt_ids, params.n),
                       exact=self.consistency == "exact")
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

    def score_exact_program(self, state, rollout: Rollout, temperature: float):
        """``(jitted function, args, kwargs)`` of :meth:`score_exact` (arrays may be abstract, for lowering)."""
        args = (self.graphdef, state, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)
        args = args + (rollout.lengths,)
        return self._score_exact, args, dict(n=rollout.n, temperature=float(temperature),
                                             cache_dtype=self.cache_dtype, compute_dtype=self.compute_dtype,
                                             compact_rows=self.compact_rows, shards=_batch_shards(rollout.prompt_ids, 1))

    def score_exact(self, state, rollout: Rollout, temperature: float):
        """Bitwise-consistent per-token (log-prob, entropy) of the rollout's tokens (``exact`` mode)."""
        fn, args, kwargs = self.score_exact_program(state, rollout, temperature)
        return fn(*args, **kwargs)
