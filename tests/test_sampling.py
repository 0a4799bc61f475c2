"""Sampler: consistency with the scorer (default and exact), sampling statistics, stops, sharing, sharding."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_llm.losses import logprobs_from_logits
from jaxrl_llm.models import attention
from jaxrl_llm.models import Decoder, ModelConfig, left_pad_positions
from jaxrl_llm.parallel import make_mesh, shard_model
from jaxrl_llm.sampling import (FINISH_LENGTH, FINISH_STOP, Sampler, SamplingParams, decode_logprobs,
                                filter_logits, mismatch_metrics, rollout_logprobs, sample_tokens, sequence_logprobs,
                                values_with_gradient)
from jaxrl_llm.compile_options import compiler_options
from jaxrl_llm.sampling.filters import gumbel_noise
from jaxrl_llm.sampling.decode import compaction_sizes
from jaxrl_llm.sampling.sampler import _batch_shards, scanned_decode_logprobs
from jaxrl_llm.trainer.packing import plan_packing

score_module = importlib.import_module("jaxrl_llm.sampling.score")  # the package exports a function `score`


def _cfg(moe=False, vocab=64):
    kw = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, moe_layers=(True, True)) if moe else {}
    return ModelConfig(model_type="qwen3_moe" if moe else "qwen3", vocab_size=vocab, hidden_size=32,
                       intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                       **kw)


def _model(moe=False, seed=0, vocab=64, scale=1.0):
    model = Decoder(_cfg(moe, vocab), rngs=nnx.Rngs(seed))
    if scale != 1.0:  # sharper distributions than the tiny random init gives
        model.embed[...] = model.embed[...] * scale
    return model


def _prompts():
    ids = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 9, 8, 7, 6]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
    return ids, mask


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("mode,new_tokens", [("default", 10), ("exact", 10), ("exact", 12), ("exact", 7)])
def test_sampler_logprobs_match_score(moe, mode, new_tokens):
    # even and odd step counts (the batch is too small to compact: test_exact_scorer_replays_compaction)
    model = _model(moe, scale=20.0)
    graphdef, state = nnx.split(model)
    sampler = Sampler(model, consistency=mode)
    params = SamplingParams(temperature=0.8, max_new_tokens=new_tokens, n=2)
    ro = sampler.generate(state, *_prompts(), params, jax.random.key(1))
    logp, ent = rollout_logprobs(sampler, graphdef, state, ro, temperature=0.8)
    m = np.asarray(ro.mask)
    diff = np.abs(np.asarray(logp) - np.asarray(ro.logprobs))[m]
    if mode == "exact":
        assert diff.max() == 0.0
        np.testing.assert_array_equal(np.asarray(logp), np.asarray(ro.logprobs))
    else:
        assert diff.max() <= 1e-5
    assert np.all(np.asarray(ent)[m] > 0)
    metrics = mismatch_metrics(ro.logprobs, logp, ro.mask)
    assert float(metrics["mismatch_abs_max"]) == pytest.approx(float(diff.max()), abs=1e-9)
    if moe:
        assert ro.experts.shape == (2, 6, 5 + new_tokens, 2)


def test_greedy_equals_argmax_of_full_forward():
    model = _model(scale=10.0)
    graphdef, state = nnx.split(model)
    ids, mask = _prompts()
    ro = Sampler(model).generate(state, ids, mask, SamplingParams(greedy=True, max_new_tokens=6), jax.random.key(0))
    seq = jnp.concatenate([ro.prompt_ids, ro.tokens], axis=1)
    full_mask = jnp.concatenate([ro.prompt_mask, ro.mask], axis=1)
    out = model(seq, left_pad_positions(full_mask), attention_mask=full_mask)
    pred = np.asarray(jnp.argmax(model.logits(out.hidden), axis=-1))[:, ids.shape[1] - 1:-1]
    np.testing.assert_array_equal(pred, np.asarray(ro.tokens))


def test_filters_exclude_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    excluded = lambda p: np.isinf(np.asarray(filter_logits(logits, p)))[0]  # noqa: E731
    assert list(excluded(SamplingParams(top_k=2))) == [False, False, True, True, True]
    # top-p 0.7: 0.5 alone is < 0.7, with 0.25 it reaches 0.75 -> keep two
    assert list(excluded(SamplingParams(top_p=0.7))) == [False, False, True, True, True]
    assert list(excluded(SamplingParams(top_p=0.76))) == [False, False, False, True, True]
    # min-p 0.2: keep p >= 0.1
    assert list(excluded(SamplingParams(min_p=0.2))) == [False, False, False, True, True]


@pytest.mark.parametrize("params", [SamplingParams(top_k=3, max_new_tokens=8, n=4),
                                    SamplingParams(top_p=0.5, max_new_tokens=8, n=4)])
def test_truncation_never_emits_excluded_tokens(params):
    model = _model(scale=5.0)
    graphdef, state = nnx.split(model)
    ids, mask = _prompts()
    ro = Sampler(model).generate(state, ids, mask, params, jax.random.key(3))
    seq = jnp.concatenate([ro.prompt_ids, ro.tokens], axis=1)
    full_mask = jnp.concatenate([ro.prompt_mask, ro.mask], axis=1)
    out = model(seq, left_pad_positions(full_mask), attention_mask=full_mask)
    logits = model.logits(out.hidden)[:, ids.shape[1] - 1:-1]
    allowed = ~np.isinf(np.asarray(filter_logits(logits.reshape(-1, logits.shape[-1]), params)))
    picked = np.asarray(ro.tokens).reshape(-1)
    ok = allowed[np.arange(picked.size), picked]
    assert ok[np.asarray(ro.mask).reshape(-1)].all()


def test_empirical_frequencies_match_softmax():
    model = _model(vocab=8, scale=3.0)
    graphdef, state = nnx.split(model)
    ids = jnp.array([[3, 1, 4]], jnp.int32)
    mask = jnp.ones((1, 3), bool)
    n = 4000
    params = SamplingParams(temperature=1.3, max_new_tokens=1, n=n)
    # statistics only, nothing stops early: one loop stage (compaction would compile six batch sizes for nothing)
    ro = Sampler(model, compact_rows=0).generate(state, ids, mask, params, jax.random.key(7))
    out = model(ids, left_pad_positions(mask), attention_mask=mask)
    probs = np.asarray(jax.nn.softmax(model.logits(out.hidden)[0, -1] / 1.3))
    counts = np.bincount(np.asarray(ro.tokens[:, 0]), minlength=8)
    # Pearson chi-square with 7 degrees of freedom: the 0.999 quantile is 24.3
    chi2 = float(np.sum((counts - n * probs) ** 2 / (n * probs)))
    assert chi2 < 24.3, (counts, n * probs)
    # and the reported log-probs are those of the temperature-scaled softmax
    np.testing.assert_allclose(np.asarray(ro.logprobs[:, 0]), np.log(probs)[np.asarray(ro.tokens[:, 0])], atol=1e-5)


def test_second_tokens_follow_the_conditional_softmax():
    # the loop draws each step's noise one step ahead: the token after the first must still follow
    # p(second | prompt, first), checked over all (first, second) pairs
    model = _model(vocab=8, scale=3.0)
    graphdef, state = nnx.split(model)
    ids = jnp.array([[3, 1, 4]], jnp.int32)
    n = 4000
    ro = Sampler(model, compact_rows=0).generate(state, ids, jnp.ones((1, 3), bool),
                                                 SamplingParams(max_new_tokens=2, n=n), jax.random.key(11))
    seqs = jnp.concatenate([jnp.repeat(ids, 8, axis=0), jnp.arange(8, dtype=jnp.int32)[:, None]], axis=1)
    out = model(seqs, jnp.broadcast_to(jnp.arange(4), (8, 4)))
    logits = model.logits(out.hidden)
    expected = n * np.asarray(jax.nn.softmax(logits[0, 2])[:, None] * jax.nn.softmax(logits[:, 3], axis=-1))
    counts = np.zeros((8, 8))
    np.add.at(counts, (np.asarray(ro.tokens[:, 0]), np.asarray(ro.tokens[:, 1])), 1)
    big = expected >= 5  # Pearson's approximation needs expected counts of at least 5: pool the others
    obs, exp = counts[big], expected[big]
    if not big.all():
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    dof = obs.size - 1
    # the 0.999 quantile of chi-square (Wilson-Hilferty approximation)
    quantile = dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < quantile, (chi2, quantile)


def test_sample_tokens_is_gumbel_max_with_the_keys_noise():
    logits = jax.random.normal(jax.random.key(0), (16, 32)) * 2.0
    params = SamplingParams(temperature=0.7, top_k=5)
    for seed in range(5):
        key = jax.random.key(seed)
        expect = jax.random.categorical(key, filter_logits(logits, params), axis=-1)
        np.testing.assert_array_equal(np.asarray(sample_tokens(key, logits, params)), np.asarray(expect))
        np.testing.assert_array_equal(
            np.asarray(sample_tokens(None, logits, params, gumbel=gumbel_noise(key, logits.shape))),
            np.asarray(expect))


def test_sampler_and_scorer_compile_alike_on_cpu():
    # XLA:CPU's default puts matrix products in YNNPACK fusions; the sampler and the trainer-side scorer both turn
    # them off (compile_options.py), so that their products round alike
    assert compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
    x = jnp.ones((32, 64))
    assert "ynn" in jax.jit(lambda a: jnp.tanh(a @ a.T)).lower(x).compile().as_text()  # the check can fail
    model = _model()
    graphdef, state = nnx.split(model)
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=4, n=2)
    for mode in ("default", "exact"):
        sampler = Sampler(model, consistency=mode)
        ro = sampler.generate(state, ids, mask, params, jax.random.key(0))
        generate = sampler.lower(state, ids, mask, params, jax.random.key(0)).compile().as_text()
        assert "ynn" not in generate and "while" in generate
    scorer = score_module._jitted_score().lower(graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                                None, temperature=1.0, chunk=512, layer=None, group=1)
    assert "ynn" not in scorer.compile().as_text()
    fn, args, kwargs = sampler.score_exact_program(state, ro, temperature=1.0)
    exact = fn.lower(*args, **kwargs)
    assert "ynn" not in exact.compile().as_text()


def test_stop_tokens_lengths_and_row_budgets():
    model = _model(scale=10.0)
    graphdef, state = nnx.split(model)
    ids, mask = _prompts()
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    sampler = Sampler(model)
    free = sampler.generate(state, ids, mask, greedy, jax.random.key(0))
    first = np.asarray(free.tokens[:, 2])  # make each row stop at its own third token
    ro = sampler.generate(state, ids, mask, greedy, jax.random.key(0), stop_tokens=first[:, None],
                          max_new_tokens=jnp.array([8, 8, 2]))
    lengths = np.asarray(ro.lengths)
    toks = np.asarray(free.tokens)
    for i in range(3):
        budget = 2 if i == 2 else 8
        expect = min(int(np.argmax(toks[i] == first[i])) + 1, budget)
        assert lengths[i] == expect
        np.testing.assert_array_equal(np.asarray(ro.tokens[i, :expect]), toks[i, :expect])
        assert not np.asarray(ro.tokens[i, expect:]).any()
        assert np.asarray(ro.mask[i]).sum() == expect
        assert int(ro.finish_reason[i]) == (FINISH_STOP if toks[i, expect - 1] == first[i] else FINISH_LENGTH)


def test_n_samples_share_prompt_and_are_deterministic():
    model = _model(scale=3.0)
    graphdef, state = nnx.split(model)
    ids, mask = _prompts()
    sampler = Sampler(model)
    params = SamplingParams(max_new_tokens=6, n=3)
    a = sampler.generate(state, ids, mask, params, jax.random.key(5))
    b = sampler.generate(state, ids, mask, params, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.prompt_ids), np.repeat(np.asarray(ids), 3, axis=0))
    # samples of one prompt differ from each other, and each equals an n=1 run's distribution support
    assert len({tuple(r) for r in np.asarray(a.tokens)[:3]}) > 1
    c = sampler.generate(state, ids, mask, params, jax.random.key(6))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


@pytest.mark.parametrize("moe,remat,packed", [(False, "none", False), (False, "none", True), (False, "full", True),
                                              (True, "none", True)])
def test_shared_prompt_scoring_equals_the_full_forward(moe, remat, packed):
    # group = n: each prompt runs once and its keys/values serve its n samples (packed: several responses of a
    # group side by side in one row); log-probs, entropies and their gradients must equal one forward per row over
    # [prompt | response] (MoE: with the sampler's routing replayed)
    model = _model(moe, scale=5.0)
    graphdef, state = nnx.split(model)
    ro = Sampler(model).generate(state, *_prompts(), SamplingParams(max_new_tokens=7, n=3, stop_tokens=(3, 4, 5, 6, 7, 8)),
                                 jax.random.key(4))
    plan = plan_packing(np.asarray(ro.mask), group=3, num_micro=1, row_multiple=1) if packed else None
    trained = nnx.graphdef(Decoder(_cfg(moe), rngs=nnx.Rngs(0), remat=remat))
    weights = jnp.linspace(-1.0, 1.0, ro.tokens.size).reshape(ro.tokens.shape)  # every position counts

    def objective(state, group, packing):
        logp, ent = sequence_logprobs(nnx.merge(trained, state), ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                      temperature=0.9, forced_experts=ro.experts, group=group, packing=packing)
        return jnp.sum(weights * logp) + 0.5 * jnp.sum(ent), (logp, ent)

    value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (_, (logp1, ent1)), grad1 = value_and_grad(state, 1, None)
    (_, (logp3, ent3)), grad3 = value_and_grad(state, 3, plan)
    lengths = np.asarray(ro.lengths)
    assert len(set(lengths.tolist())) > 2  # several lengths, stops included
    if packed:
        assert plan.src.shape[0] < len(lengths)  # responses did share rows
    np.testing.assert_allclose(np.asarray(logp3), np.asarray(logp1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent3), np.asarray(ent1), atol=1e-5)
    for g1, g3 in zip(jax.tree.leaves(grad1), jax.tree.leaves(grad3)):
        np.testing.assert_allclose(np.asarray(g3), np.asarray(g1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="groups of 4"):
        sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, group=4)
    if packed:
        with pytest.raises(ValueError, match="packing needs group"):
            sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, packing=plan)


def test_values_with_gradient_returns_the_values_and_differentiates_the_function():
    x = jnp.array([0.3, -1.2, 2.0])
    y = jnp.array([1.0, 2.0, -0.5])

    def fn(x, y):
        return jnp.sin(x) * y, jnp.sum(x ** 2)

    values = (jnp.array([7.0, 8.0, 9.0]), jnp.float32(-1.0))  # anything shaped like fn's output

    def loss(x, y, how):
        a, b = how(x, y)
        return jnp.sum(a * jnp.arange(1.0, 4.0)) + 3.0 * b, (a, b)

    (_, (a, b)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, y, lambda x, y: values_with_gradient(values, fn, x, y))
    _, want = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, y, fn)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(values[0]))
    assert float(b) == -1.0
    for g, w in zip(grads, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
    # by hand: d/dx = cos(x) * y * [1, 2, 3] + 6 x; d/dy = sin(x) * [1, 2, 3]
    np.testing.assert_allclose(np.asarray(grads[0]), np.cos(x) * y * np.arange(1, 4) + 6 * x, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), np.sin(x) * np.arange(1, 4), rtol=1e-6)


@pytest.mark.parametrize("moe,key_block", [(False, None), (True, None), (False, 4)])
def test_decode_logprobs_are_the_samplers_and_differentiate_like_the_decode_loop(moe, key_block, monkeypatch):
    # exact mode's update: the forward values under jax.grad are the sampler's bit for bit, and the gradient (the
    # full-sequence forward's) is the decode loop's own gradient to rounding. With key blocks of 4 slots the decode
    # steps visit the 15-slot cache in a loop (3 full blocks and a cut one)
    if key_block:
        monkeypatch.setattr(attention, "KEY_BLOCK", key_block)
    model = _model(moe, scale=20.0)
    _, state = nnx.split(model)
    sampler = Sampler(model, consistency="exact")
    ro = sampler.generate(state, *_prompts(), SamplingParams(temperature=0.8, max_new_tokens=10, n=2),
                          jax.random.key(1))
    weights = jax.random.normal(jax.random.key(2), ro.tokens.shape)
    kw = dict(n=2, temperature=0.8, cache_dtype=sampler.cache_dtype)

    def loss(logp, ent):
        return jnp.sum(weights * logp) + 0.1 * jnp.sum(ent)

    def exact(st):
        logp, ent = decode_logprobs(sampler.graphdef, st, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                    ro.lengths, **kw)
        return loss(logp, ent), logp

    def loop(st):  # the decode steps as a scan, differentiated directly: the reference gradient
        logp, ent = scanned_decode_logprobs(sampler.graphdef, st, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                            **kw)
        return loss(logp, ent), logp

    grad = functools.partial(jax.jit, compiler_options=compiler_options())
    (_, logp), g = grad(jax.value_and_grad(exact, has_aux=True))(state)
    (_, logp_loop), g_loop = grad(jax.value_and_grad(loop, has_aux=True))(state)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(ro.logprobs))
    assert np.abs(np.asarray(logp_loop) - np.asarray(logp)).max() < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_loop)):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale)


def test_sharded_equals_unsharded_and_exact_under_mesh():
    model = _model(moe=True, scale=5.0)
    graphdef, state = nnx.split(model)
    ids, mask = _prompts()
    ids = jnp.concatenate([ids, ids[:1]])  # 4 prompts
    mask = jnp.concatenate([mask, mask[:1]])
    params = SamplingParams(max_new_tokens=6, n=2)
    ref = Sampler(model).generate(state, ids, mask, params, jax.random.key(2))

    sharded_model = _model(moe=True, scale=5.0)
    mesh = make_mesh({"data": 2, "tensor": 2, "expert": 2})
    shard_model(sharded_model, mesh)
    gd2, state2 = nnx.split(sharded_model)
    batch = NamedSharding(mesh, P("data"))
    sampler = Sampler(sharded_model, consistency="exact")
    ro = sampler.generate(state2, jax.device_put(ids, batch), jax.device_put(mask, batch), params,
                          jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(ro.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    logp, _ = rollout_logprobs(sampler, gd2, state2, ro, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(ro.logprobs))


def _while_loops(fn, graphdef, *args, **static) -> int:
    jaxpr = jax.make_jaxpr(functools.partial(fn, graphdef, **static))(*args)
    return sum(e.primitive.name == "while" for e in jaxpr.eqns)


def test_compaction_sizes():
    assert compaction_sizes(64, 8) == (64, 32, 16, 8)
    assert compaction_sizes(48, 8) == (48, 24, 12)
    assert compaction_sizes(40, 8) == (40, 20, 10)
    assert compaction_sizes(30, 4) == (30, 15)
    assert compaction_sizes(8, 8) == (8,)
    assert compaction_sizes(64, 0) == (64,)


def test_compacted_decoding_equals_the_full_batch():
    # most rows stop early: the loop moves the rest into batches of 16, then 8 rows. The same key must give the
    # same tokens, stops and routing as the uncompacted loop, log-probs equal up to rounding, on one device and
    # with the batch sharded over a mesh, where each of the 2 data shards compacts its own rows (16 -> 8 -> 4)
    # (MoE: the dense path is the same loop without routing)
    model = _model(moe=True, scale=3.0)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (8, 5)), jnp.int32)
    mask = jnp.ones((8, 5), bool)
    params = SamplingParams(max_new_tokens=20, n=4, stop_tokens=tuple(range(3, 12)))
    full = Sampler(model, compact_rows=0).generate(state, ids, mask, params, jax.random.key(3))
    compact = Sampler(model, compact_rows=8)
    lengths = np.sort(np.asarray(full.lengths))
    assert lengths[-9] < lengths[-1]  # at most 8 rows still going before the end: both compactions happen

    loop_args = (state, ids, mask, jax.random.key(3), jnp.full((32, 1), 3, jnp.int32), jnp.full((32,), 20, jnp.int32))
    static = dict(params=params, cache_dtype=jnp.float32, compute_dtype=None)
    assert _while_loops(compact._generate.__wrapped__, graphdef, *loop_args, **static, compact_rows=2) == 5
    assert _while_loops(compact._generate.__wrapped__, graphdef, *loop_args, **static, compact_rows=0) == 1

    mesh = make_mesh({"data": 2, "tensor": 2, "expert": 2})
    sharded_model = _model(moe=True, scale=3.0)
    shard_model(sharded_model, mesh)
    batch = NamedSharding(mesh, P("data"))
    assert _batch_shards(jax.device_put(ids, batch), 1) == 2 and _batch_shards(ids, 1) == 1
    with jax.set_mesh(make_mesh({"fsdp": 8})):  # traced on a mesh: its row split, when the samples divide over it
        assert _batch_shards(ids[:4], 2) == 8 and _batch_shards(ids[:3], 2) == 1
    runs = [compact.generate(state, ids, mask, params, jax.random.key(3)),
            Sampler(sharded_model).generate(nnx.split(sharded_model)[1], jax.device_put(ids, batch),
                                                            jax.device_put(mask, batch), params, jax.random.key(3))]
    fed = np.concatenate([np.ones((32, 5), bool), np.asarray(full.mask)], axis=1)  # routing of every fed token
    for ro in runs:
        for field in ("tokens", "lengths", "finish_reason", "mask"):
            np.testing.assert_array_equal(np.asarray(getattr(ro, field)), np.asarray(getattr(full, field)))
        np.testing.assert_allclose(np.asarray(ro.logprobs), np.asarray(full.logprobs), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ro.experts)[:, fed], np.asarray(full.experts)[:, fed])
    with pytest.raises(ValueError, match="compact_rows"):
        Sampler(model, compact_rows=-1)
    # exact mode compacts too, and its scorer replays the compaction bit for bit (one device; a data mesh whose
    # 2 shards compact their own rows)
    exact = Sampler(model, consistency="exact")
    exact_ro = exact.generate(state, ids, mask, params, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(exact_ro.tokens), np.asarray(full.tokens))
    logp, _ = rollout_logprobs(exact, graphdef, state, exact_ro, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(exact_ro.logprobs))
    sharded_exact = Sampler(sharded_model, consistency="exact")
    state2 = nnx.split(sharded_model)[1]
    exact_ro = sharded_exact.generate(state2, jax.device_put(ids, batch), jax.device_put(mask, batch), params,
                                      jax.random.key(3))
    logp, _ = rollout_logprobs(sharded_exact, graphdef, state2, exact_ro, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(exact_ro.logprobs))


def test_bf16_sampler_against_fp32_scorer():
    model = _model(scale=10.0)
    graphdef, state = nnx.split(model)
    sampler = Sampler(model, compute_dtype=jnp.bfloat16)
    ro = sampler.generate(state, *_prompts(), SamplingParams(max_new_tokens=8), jax.random.key(0))
    logp, _ = rollout_logprobs(sampler, graphdef, state, ro, temperature=1.0)
    m = mismatch_metrics(ro.logprobs, logp, ro.mask)
    # bf16 has ~3 significant digits: a real but bounded mismatch
    assert 1e-5 < float(m["mismatch_abs_max"]) < 0.5
    with pytest.raises(ValueError, match="exact"):
        Sampler(model, consistency="exact", compute_dtype=jnp.bfloat16)


def test_bad_input():
    model = _model()
    _, state = nnx.split(model)
    sampler = Sampler(model)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="empty prompt at row"):
        sampler.generate(state, ids, mask.at[0].set(False), SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match="empty prompt at row"):  # lowering checks the same inputs
        sampler.lower(state, ids, mask.at[0].set(False), SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate(state, ids, mask, SamplingParams(max_new_tokens=5000), jax.random.key(0))
    with pytest.raises(ValueError, match="left-padded"):
        sampler.generate(state, ids, mask.at[1, -1].set(False), SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="consistency"):
        Sampler(model, consistency="strict")
    # reported log-probs use the full (untruncated) temperature softmax
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    assert float(logprobs_from_logits(logits, jnp.array([[1]]))[0, 0]) == pytest.approx(np.log(0.3), rel=1e-5)


def test_the_sampler_gathers_the_unembedding_once_on_an_fsdp_mesh():
    # every decode step multiplies by the whole [embed, vocab] unembedding; with the weights split over fsdp, the
    # prefill and each decode loop of row compaction would gather a copy of their own before they start, all live
    # at once. Gathered once, the compiled temporaries hold less than three copies (one copy per loop: over five)
    from jaxrl_llm.parallel import Layout

    cfg = ModelConfig(model_type="qwen3", vocab_size=8192, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=256,
                      eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    layout = Layout(make_mesh({"fsdp": 8}))
    model = shard_model(Decoder(cfg, rngs=nnx.Rngs(0)), layout.mesh)
    sampler = Sampler(model)
    params = SamplingParams(n=8, max_new_tokens=64, temperature=1.0)
    assert len(compaction_sizes(64, sampler.compact_rows)) >= 3  # several decode loops
    with layout.active():
        ids, mask = layout.place_rows(jnp.ones((8, 8), jnp.int32)), layout.place_rows(jnp.ones((8, 8), bool))
        compiled = sampler.lower(nnx.state(model), ids, mask, params, jax.random.key(0)).compile()
    unembedding = cfg.hidden_size * cfg.vocab_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 3 * unembedding
