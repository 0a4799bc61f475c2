"""Exploration remedies and rollout correction: formulas on hand-derived cases, identities, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxrl_llm.advantages as A
import jaxrl_llm.losses as L
from jaxrl_llm.losses import exploration as X


def _a(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x), dtype)


# ---- rollout correction -----------------------------------------------------------------------------------

def test_token_tis_truncates_at_the_cap():
    sampler = _a([[-1.0, -2.0, -3.0, 0.0]])
    # ratios pi/mu = e^0.5, e^1, e^-1, (padding)
    trainer = sampler + _a([[0.5, 1.0, -1.0, 7.0]])
    mask = jnp.array([[True, True, True, False]])
    w, m = L.rollout_correction(trainer, sampler, mask, is_level="token", cap=2.0)
    np.testing.assert_allclose(np.asarray(w), [[math.exp(0.5), 2.0, math.exp(-1.0), 0.0]], rtol=1e-6)
    assert float(m["rc_truncated_frac"]) == pytest.approx(1 / 3)
    assert float(m["rc_masked_frac"]) == 0.0
    assert float(m["rc_ratio_max"]) == pytest.approx(math.e, rel=1e-6)


def test_sequence_tis_uses_the_product_of_ratios():
    sampler = jnp.zeros((2, 3))
    trainer = _a([[0.1, 0.2, 0.0], [0.5, 0.5, 0.5]])
    mask = jnp.array([[True, True, False], [True, True, True]])
    w, _ = L.rollout_correction(trainer, sampler, mask, is_level="sequence", cap=2.0)
    # row 0: exp(0.3) on its two tokens (the third is padding); row 1: exp(1.5) > 2 is cut to 2
    np.testing.assert_allclose(np.asarray(w), [[math.exp(0.3), math.exp(0.3), 0.0], [2.0, 2.0, 2.0]], rtol=1e-6)


@pytest.mark.parametrize("level, expected_keep", [
    ("token", [[1, 0, 1], [1, 1, 1]]),        # token 1 of row 0 has ratio e^1 > 2
    ("sequence", [[0, 0, 0], [1, 1, 1]]),     # row 0: product e^1.2 > 2; row 1: e^0.6 < 2
    ("geometric", [[1, 1, 1], [1, 1, 1]]),    # per-token means 0.4 and 0.2: e^0.4 < 2
])
def test_masked_is_criteria(level, expected_keep):
    sampler = jnp.zeros((2, 3))
    trainer = _a([[0.1, 1.0, 0.1], [0.2, 0.2, 0.2]])
    mask = jnp.ones((2, 3), bool)
    w, m = L.rollout_correction(trainer, sampler, mask, is_level="none", mask_level=level, low=0.5, high=2.0)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(expected_keep, np.float32))
    assert float(m["rc_masked_frac"]) == pytest.approx(1 - np.mean(expected_keep))


def test_masked_is_drops_low_ratios_too():
    trainer = _a([[-1.0, 0.0]])
    w, _ = L.rollout_correction(trainer, jnp.zeros((1, 2)), jnp.ones((1, 2), bool), is_level="token",
                                mask_level="token", low=0.5, high=2.0)
    np.testing.assert_allclose(np.asarray(w), [[0.0, 1.0]])  # e^-1 < 0.5 is rejected


def test_correction_weights_carry_no_gradient():
    def total(t):
        w, _ = L.rollout_correction(t, jnp.zeros((1, 2)), jnp.ones((1, 2), bool))
        return w.sum()

    assert np.all(np.asarray(jax.grad(total)(_a([[0.1, 0.2]]))) == 0.0)


def test_correction_bad_input():
    x, m = jnp.zeros((1, 2)), jnp.ones((1, 2), bool)
    with pytest.raises(ValueError, match="is_level"):
        L.rollout_correction(x, x, m, is_level="tokens")
    with pytest.raises(ValueError, match="cap"):
        L.rollout_correction(x, x, m, cap=0.5)
    with pytest.raises(ValueError, match="band"):
        L.rollout_correction(x, x, m, mask_level="token", low=1.5, high=2.0)
    with pytest.raises(ValueError, match="shape"):
        L.rollout_correction(x, jnp.zeros((1, 3)), m)


# ---- covariance selections --------------------------------------------------------------------------------

def test_token_covariance_hand_case():
    logp = _a([[-1.0, -3.0], [-2.0, -9.0]])
    adv = _a([[1.0, 1.0], [-1.0, 5.0]])
    mask = jnp.array([[True, True], [True, False]])
    # valid: logp (-1, -3, -2) mean -2; adv (1, 1, -1) mean 1/3
    expected = [[1.0 * (2 / 3), -1.0 * (2 / 3)], [0.0 * (-4 / 3), 0.0]]
    np.testing.assert_allclose(np.asarray(X.token_covariance(logp, adv, mask)), expected, atol=1e-6)


def test_clip_cov_draws_the_right_number_from_the_band():
    cov = _a(np.linspace(-2, 8, 200).reshape(10, 20))
    mask = jnp.ones((10, 20), bool)
    in_band = (np.asarray(cov) >= 1.0) & (np.asarray(cov) <= 5.0)
    picks = []
    for seed in range(3):
        chosen = np.asarray(X.clip_cov_select(cov, mask, jax.random.key(seed), ratio=0.05, low=1.0, high=5.0))
        assert chosen.sum() == 10  # floor(0.05 * 200)
        assert np.all(in_band[chosen])
        picks.append(chosen)
    assert not np.array_equal(picks[0], picks[1])  # a random draw, not a fixed set
    # tokens outside the candidate pool (e.g. already clipped by PPO) are never drawn
    allowed = np.zeros((10, 20), bool)
    allowed[5:] = True
    chosen = np.asarray(X.clip_cov_select(cov, mask, jax.random.key(0), ratio=0.05, candidates=jnp.asarray(allowed)))
    assert chosen.sum() == 10 and np.all(allowed[chosen])


def test_clip_cov_takes_at_least_one_token_and_none_from_an_empty_band():
    cov = _a([[2.0, 0.0, 0.0]])
    mask = jnp.ones((1, 3), bool)
    assert int(X.clip_cov_select(cov, mask, jax.random.key(0), ratio=2e-4).sum()) == 1
    assert int(X.clip_cov_select(cov * 0, mask, jax.random.key(0), ratio=2e-4).sum()) == 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2 ** 16))
def test_top_fraction_count_and_order(n, frac, seed):
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(1, 64)).astype(np.float32)  # distinct almost surely
    mask = np.zeros((1, 64), bool)
    mask[0, rng.choice(64, n, replace=False)] = True
    chosen = np.asarray(X.top_fraction(jnp.asarray(score), jnp.asarray(mask), frac))
    k = max(int(math.floor(np.float32(frac) * np.float32(n))), 1)  # the kernel counts in float32
    assert chosen.sum() == k and np.all(mask[chosen])
    assert score[chosen].min() >= score[mask & ~chosen].max(initial=-np.inf)


def test_kl_cov_selects_the_top_covariance_tokens():
    cov = _a([[0.1, 3.0, -1.0, 2.0, 0.5]])
    chosen = np.asarray(X.kl_cov_select(cov, jnp.ones((1, 5), bool), ratio=0.4))
    np.testing.assert_array_equal(chosen, [[False, True, False, True, False]])


def test_gate_gradient_stops_only_the_selected_tokens():
    logp = _a([[0.3, -0.2, 0.1]])
    stop = jnp.array([[False, True, False]])
    g = jax.grad(lambda x: jnp.sum(X.gate_gradient(x, stop) * 2.0))(logp)
    np.testing.assert_array_equal(np.asarray(g), [[2.0, 0.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(X.gate_gradient(logp, stop)), np.asarray(logp))


def test_adaptive_entropy_coefficient():
    assert float(X.adaptive_entropy_coef(0.01, 0.1, target=0.3, step=0.005, max_coef=0.05)) == pytest.approx(0.015)
    assert float(X.adaptive_entropy_coef(0.01, 0.5, target=0.3, step=0.005, max_coef=0.05)) == pytest.approx(0.005)
    assert float(X.adaptive_entropy_coef(0.002, 0.5, target=0.3, step=0.005, max_coef=0.05)) == 0.0
    assert float(X.adaptive_entropy_coef(0.049, 0.1, target=0.3, step=0.005, max_coef=0.05)) == pytest.approx(0.05)


# ---- Differential Smoothing -------------------------------------------------------------------------------

def test_differential_smoothing_check_value():
    # Differential Smoothing (arXiv 2511.19942, Eq. 6) by hand: A = +-0.5, log pi_old(y) = -20, gamma = 0.01 -> +-0.7
    adv = _a([0.5, -0.5])
    out = A.differential_smoothing(adv, _a([-20.0, -20.0]), jnp.array([True, False]), gamma_pos=0.01,
                                   gamma_neg=0.01)
    np.testing.assert_allclose(np.asarray(out), [0.7, -0.7], rtol=1e-6)


def test_sequence_logprob_sum_and_mean():
    logp = _a([[-1.0, -2.0, -5.0]])
    mask = jnp.array([[True, True, False]])
    assert float(A.sequence_logprob(logp, mask)[0]) == -3.0
    assert float(A.sequence_logprob(logp, mask, length_norm=True)[0]) == -1.5


def test_differential_smoothing_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        A.differential_smoothing(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, bool), gamma_pos=-1.0, gamma_neg=0.0)
    with pytest.raises(ValueError, match="shape"):
        A.differential_smoothing(jnp.zeros(2), jnp.zeros(3), jnp.zeros(2, bool), gamma_pos=0.1, gamma_neg=0.0)
