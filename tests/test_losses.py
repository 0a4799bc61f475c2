"""Policy losses: paper check values, hypothesis identities, gradients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxrl_llm.losses as L

F32 = np.float32


def _arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x), dtype)


# ---- check values derived by hand from the formulas: PPO clip (arXiv 1707.06347) with DAPO's clip-higher ----
# ---- (arXiv 2503.14476), k3 KL, group advantages (GRPO arXiv 2402.03300, Dr. GRPO arXiv 2503.20783) -------

@pytest.mark.parametrize(
    "adv, ratio, expected_objective, clipped",
    [(1.0, 1.5, 1.28, True), (-1.0, 0.5, -0.8, True), (-1.0, 1.5, -1.5, False)],
)
def test_ppo_clip_table(adv, ratio, expected_objective, clipped):
    old = _arr([[0.0]])
    adv_a = _arr([[adv]])
    mask = jnp.ones((1, 1), bool)

    def loss(logp):
        return L.ppo_clip(logp, old, adv_a, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)[0]

    logp = _arr([[np.log(ratio)]])
    value = loss(logp)
    assert float(value) == pytest.approx(-expected_objective, rel=1e-6)
    grad = jax.grad(loss)(logp)
    if clipped:
        assert float(grad[0, 0]) == 0.0
    else:
        # d(-A r)/dlogp = -A r
        assert float(grad[0, 0]) == pytest.approx(-adv * ratio, rel=1e-6)
    _, metrics = L.ppo_clip(logp, old, adv_a, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    side = "clip_frac_high" if ratio > 1 else "clip_frac_low"
    assert float(metrics[side]) == (1.0 if clipped else 0.0)
    assert float(metrics["dual_clip_frac"]) == 0.0


def test_dual_clip_binds_for_large_ratio_negative_advantage():
    logp = _arr([[np.log(5.0)]])
    loss, m = L.ppo_clip(logp, _arr([[0.0]]), _arr([[-1.0]]), jnp.ones((1, 1), bool), dual_clip=3.0)
    assert float(loss) == pytest.approx(3.0)  # bounded by -c*A = 3 instead of 5
    assert float(m["dual_clip_frac"]) == 1.0
    assert float(jax.grad(lambda lp: L.ppo_clip(lp, _arr([[0.0]]), _arr([[-1.0]]), jnp.ones((1, 1), bool),
                                                 dual_clip=3.0)[0])(logp)[0, 0]) == 0.0


def test_gspo_check_value_clips_and_zero_grad():
    lr = np.array([[0.02, -0.01, 0.05]], F32)
    old = _arr(np.zeros((1, 3)))
    adv = _arr(np.ones((1, 3)))
    mask = jnp.ones((1, 3), bool)
    loss, m = L.gspo(_arr(lr), old, adv, mask)
    assert float(m["seq_ratio_mean"]) == pytest.approx(np.exp(0.02), rel=1e-6)
    assert float(np.exp(0.02)) == pytest.approx(1.0202013, rel=1e-7)
    assert float(loss) == pytest.approx(-1.0004, rel=1e-6)
    assert float(m["clip_frac_high"]) == 1.0
    g = jax.grad(lambda lp: L.gspo(lp, old, adv, mask)[0])(_arr(lr))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---- hypothesis identities ------------------------------------------------------------------------------

# fixed array shapes (so each jitted function compiles once); hypothesis varies values and masks
shapes = st.just((3, 6))


def _random_inputs(seed, b, t, scale=0.3):
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(1.0, 0.5, (b, t))).astype(F32)
    old = (logp + rng.normal(0, scale, (b, t))).astype(F32)
    adv = rng.normal(0, 1, (b, t)).astype(F32)
    mask = rng.random((b, t)) < 0.8
    mask[:, 0] = True
    return _arr(logp), _arr(old), _arr(adv), jnp.asarray(mask)


_ppo_jit = jax.jit(lambda lp, old, a, m, agg: L.ppo_clip(lp, old, a, m, agg=agg, clip_low=0.2, clip_high=0.28),
                   static_argnums=4)
_agg_jit = jax.jit(L.aggregate, static_argnums=2)
_ppo_grad = jax.jit(jax.grad(lambda lp, old, a, m: L.ppo_clip(lp, old, a, m, clip_low=0.2, clip_high=0.28)[0]))


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 10_000), st.sampled_from(L.AGG_MODES))
def test_ratio_one_loss_is_minus_mean_advantage(shape, seed, agg):
    logp, _, adv, mask = _random_inputs(seed, *shape)
    loss, m = _ppo_jit(logp, logp, adv, mask, agg)
    np.testing.assert_allclose(float(loss), float(-_agg_jit(adv, mask, agg)), rtol=1e-5, atol=1e-6)
    assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.0
    assert float(m["ratio_mean"]) == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 10_000))
def test_clipped_tokens_get_exactly_zero_gradient(shape, seed):
    logp, old, adv, mask = _random_inputs(seed, *shape, scale=0.6)
    grad = _ppo_grad(logp, old, adv, mask)
    ratio = np.exp(np.asarray(logp - old))
    a = np.asarray(adv)
    clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8))
    clipped &= np.asarray(mask)
    assert np.all(np.asarray(grad)[clipped] == 0.0)
    free = np.asarray(mask) & ~clipped & (a != 0)
    assert np.all(np.asarray(grad)[free] != 0.0)


def _gspo_value_and_grad(fn, agg):
    return jax.jit(jax.value_and_grad(
        lambda lp, old, a, m, eps: fn(lp, old, a, m, agg=agg, clip_low=eps, clip_high=eps * 1.3)[0]),
        static_argnums=4)


_gspo_vg = {(agg, name): _gspo_value_and_grad(L.POLICY_LOSSES[name], agg)
            for agg in L.AGG_MODES for name in ("gspo", "gspo_token")}


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 10_000), st.sampled_from(L.AGG_MODES), st.sampled_from([3e-4, 1e-2, 0.2]))
def test_gspo_token_equals_gspo_for_sequence_constant_advantage(shape, seed, agg, eps):
    logp, old, adv, mask = _random_inputs(seed, *shape, scale=0.02)
    adv = jnp.broadcast_to(adv[:, :1], adv.shape)

    v1, g1 = _gspo_vg[agg, "gspo"](logp, old, adv, mask, eps)
    v2, g2 = _gspo_vg[agg, "gspo_token"](logp, old, adv, mask, eps)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-6)


def test_is_weights_scale_the_token_losses():
    logp, old, adv, mask = _random_inputs(3, 2, 5)
    w = jnp.full(logp.shape, 2.0)
    base = L.ppo_clip(logp, old, adv, mask)[0]
    weighted = L.ppo_clip(logp, old, adv, mask, is_weights=w)[0]
    assert float(weighted) == pytest.approx(2 * float(base), rel=1e-6)


def test_cispo_and_pg_gradients():
    logp, old, adv, mask = _random_inputs(5, 2, 4, scale=0.5)
    g = jax.grad(lambda lp: L.pg(lp, old, adv, mask, agg="token-sum")[0])(logp)
    np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(mask), -np.asarray(adv), 0.0), rtol=1e-6)
    g = jax.grad(lambda lp: L.cispo(lp, old, adv, mask, agg="token-sum", clip_high=0.2)[0])(logp)
    w = np.minimum(np.exp(np.asarray(logp - old)), 1.2)
    np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(mask), -w * np.asarray(adv), 0.0), rtol=1e-5)


def test_metrics_on_empty_mask_are_finite():
    logp, old, adv, _ = _random_inputs(1, 2, 3)
    mask = jnp.zeros((2, 3), bool)
    for name, fn in L.POLICY_LOSSES.items():
        loss, m = fn(logp, old, adv, mask)
        assert float(loss) == 0.0, name
        assert all(np.isfinite(float(v)) for v in m.values()), name


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_naming_the_argument():
    logp, old, adv, mask = _random_inputs(0, 2, 3)
    with pytest.raises(ValueError, match="advantages"):
        L.ppo_clip(logp, old, adv[:, :2], mask)
    with pytest.raises(ValueError, match="logp must be a 2-D"):
        L.ppo_clip(logp[0], old[0], adv[0], mask[0])
    with pytest.raises(ValueError, match="clip_low"):
        L.ppo_clip(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="clip_high"):
        L.gspo(logp, old, adv, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        L.ppo_clip(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="unknown mode 'mean'.*token-mean"):
        L.ppo_clip(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'.*ppo_clip"):
        L.get_policy_loss("ppo")
    # raised at trace time inside jit
    with pytest.raises(ValueError, match="old_logp"):
        jax.jit(L.ppo_clip)(logp, old[:1], adv, mask)
