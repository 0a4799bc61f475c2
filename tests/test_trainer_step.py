"""The jitted update step: micro-batch accumulation equals one big batch, NaN skipping, a toy GRPO run learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_llm.demo import run_demo
from jaxrl_llm.models import Decoder, ModelConfig
from jaxrl_llm.sampling import sequence_logprobs
from jaxrl_llm.config import AlgorithmSection
from jaxrl_llm.trainer.step import Experience, make_update_step, minibatch_normalizer, split_micro


_MODEL = ModelConfig(model_type="qwen3", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


def _setup(agg):
    model = Decoder(_MODEL, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    n, p, r = 8, 4, 6
    mask = np.arange(r)[None] < rng.integers(1, r + 1, n)[:, None]
    exp = Experience(
        prompt_ids=jnp.asarray(rng.integers(1, 40, (n, p)), jnp.int32), prompt_mask=jnp.ones((n, p), bool),
        tokens=jnp.asarray(rng.integers(1, 40, (n, r)), jnp.int32), mask=jnp.asarray(mask),
        advantages=jnp.asarray(np.repeat(rng.normal(size=(n, 1)), r, 1), jnp.float32),
        old_logp=jnp.asarray(-3.7 + 0.1 * rng.normal(size=(n, r)), jnp.float32),
        ref_logp=jnp.asarray(-3.7 + 0.1 * rng.normal(size=(n, r)), jnp.float32))
    loss_cfg = AlgorithmSection(loss_agg=agg, clip_high=0.28, kl_coef=0.1, entropy_coef=0.01)
    opt = optax.sgd(0.1)

    def logprob_fn(m, e):
        return sequence_logprobs(m, e.prompt_ids, e.prompt_mask, e.tokens, e.mask, chunk=4)

    update = jax.jit(make_update_step(graphdef, opt, loss_cfg, logprob_fn))
    return params, rest, opt.init(params), exp, loss_cfg, update


def test_micro_batches_equal_one_batch():
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        params, rest, opt_state, exp, loss_cfg, update = _setup(agg)
        norm = minibatch_normalizer(exp.mask, loss_cfg)
        p1, _, m1 = update(params, rest, opt_state, split_micro(exp, 1), norm)
        p4, _, m4 = update(params, rest, opt_state, split_micro(exp, 4), norm)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        for key in ("loss", "policy_loss", "kl_loss", "entropy", "grad_norm"):
            np.testing.assert_allclose(float(m1[key]), float(m4[key]), rtol=1e-5, atol=1e-7)
        assert float(m1["skipped_nonfinite"]) == 0.0
        assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
                   for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))


def test_nonfinite_loss_skips_the_update():
    params, rest, opt_state, exp, loss_cfg, update = _setup("token-mean")
    bad = exp.replace(advantages=exp.advantages.at[0, 0].set(jnp.nan))
    new_params, new_opt, metrics = update(params, rest, opt_state, split_micro(bad, 2),
                                          minibatch_normalizer(bad.mask, loss_cfg))
    assert float(metrics["skipped_nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_toy_grpo_raises_reward(capsys):
    run_demo(seed=1, steps=12)
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.strip().splitlines()[-1].split()[1:4:2])
    assert last > first + 0.2, out
    # the demo's mismatch column: the log-probs the update differentiates against the sampler's, every step
    steps = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(steps) == 12 and all(float(cols[4]) == 0.0 for cols in steps), out


def test_old_logp_from_the_update_equals_a_scoring_pass():
    # a single update on fresh rollouts: old log-probs taken from the update's own forward (stop-gradient) give the
    # update that a separate scoring pass gives; train_sampler_* compare the differentiated log-probs with the sampler's
    params, rest, opt_state, exp, loss_cfg, update = _setup("seq-mean-token-mean")
    model = Decoder(_MODEL, rngs=nnx.Rngs(0))  # the same weights as params
    scored, _ = sequence_logprobs(model, exp.prompt_ids, exp.prompt_mask, exp.tokens, exp.mask, chunk=4)
    rng = np.random.default_rng(1)
    sampler = jnp.where(exp.mask, scored + jnp.asarray(1e-3 * rng.normal(size=scored.shape), jnp.float32), 0.0)
    norm = minibatch_normalizer(exp.mask, loss_cfg)
    with_pass = exp.replace(old_logp=scored, sampler_logp=sampler)
    p1, _, m1 = update(params, rest, opt_state, split_micro(with_pass, 2), norm)
    p2, _, m2 = update(params, rest, opt_state, split_micro(with_pass.replace(old_logp=None), 2), norm)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    d = np.where(exp.mask, np.asarray(scored) - np.asarray(sampler), 0.0)
    count = exp.mask.sum()
    np.testing.assert_allclose(float(m2["train_sampler_abs_max"]), np.abs(d).max(), rtol=1e-3)
    np.testing.assert_allclose(float(m2["train_sampler_abs_mean"]), np.abs(d).sum() / count, rtol=1e-3)
    np.testing.assert_allclose(float(m2["train_sampler_kl"]), np.where(exp.mask, np.expm1(d) - d, 0).sum() / count,
                               rtol=2e-2)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5, atol=1e-7)
    for key in ("train_sampler_abs_max", "train_sampler_abs_mean", "train_sampler_kl"):  # the same log-probs
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-6, err_msg=key)


def test_dr_grpo_constant_normaliser_reaches_the_loss():
    # seq-mean-token-sum-norm divides each response's token sum by a constant (Dr. GRPO: the generation budget),
    # not by the padded length of the batch, which changes when responses are trimmed
    params, rest, opt_state, exp, _, _ = _setup("seq-mean-token-sum-norm")
    algo = AlgorithmSection(loss_agg="seq-mean-token-sum-norm", kl_coef=0.1, entropy_coef=0.01)

    def logprob_fn(m, e):
        return sequence_logprobs(m, e.prompt_ids, e.prompt_mask, e.tokens, e.mask, chunk=4)

    norm = minibatch_normalizer(exp.mask, algo)
    padded = exp.mask.shape[1]
    metrics = {}
    for constant in (None, 40.0):
        update = jax.jit(make_update_step(nnx.graphdef(Decoder(_MODEL, rngs=nnx.Rngs(0))), optax.sgd(0.1), algo,
                                          logprob_fn, agg_constant=constant))
        metrics[constant] = update(params, rest, opt_state, split_micro(exp, 2), norm)[2]
    for key in ("policy_loss", "entropy", "kl_loss"):
        np.testing.assert_allclose(float(metrics[40.0][key]), float(metrics[None][key]) * padded / 40.0, rtol=1e-5)
