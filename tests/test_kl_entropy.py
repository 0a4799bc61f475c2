"""KL estimators, entropy and the chunked log-prob kernel against float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given, settings, strategies as st

import jaxrl_llm.losses as L


def test_k3_check_value():
    v = L.kl(jnp.array([[-1.0]]), jnp.array([[-1.5]]), "k3")
    assert float(v[0, 0]) == pytest.approx(0.1065307, abs=1e-7)


def test_estimators_values_and_gradients():
    logp = jnp.array([[-1.0, -0.2]])
    ref = jnp.array([[-1.5, -0.1]])
    x = np.asarray(ref - logp)
    np.testing.assert_allclose(L.kl(logp, ref, "k1"), -x, rtol=1e-6)
    np.testing.assert_allclose(L.kl(logp, ref, "k2"), 0.5 * x**2, rtol=1e-6)
    k3 = np.expm1(x) - x
    np.testing.assert_allclose(L.kl(logp, ref, "k3+"), k3, rtol=1e-5, atol=1e-7)
    g_k2 = jax.grad(lambda lp: L.kl(lp, ref, "k2").sum())(logp)
    g_k3p = jax.grad(lambda lp: L.kl(lp, ref, "k3+").sum())(logp)
    np.testing.assert_allclose(g_k3p, g_k2, rtol=1e-6)
    np.testing.assert_allclose(g_k2, -x, rtol=1e-6)  # d/dlogp 0.5 (ref - logp)^2


def test_clamp():
    v = L.kl(jnp.array([[-20.0]]), jnp.array([[0.0]]), "k3")
    assert float(v[0, 0]) == 10.0
    v = L.kl(jnp.array([[-20.0]]), jnp.array([[0.0]]), "k3", clamp=None)
    assert float(v[0, 0]) > 1e8


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-8, 0), min_size=2, max_size=8), st.lists(st.floats(-8, 0), min_size=2, max_size=8))
def test_k3_nonnegative_and_zero_at_equality(a, b):
    n = min(len(a), len(b))
    logp, ref = jnp.array([a[:n]]), jnp.array([b[:n]])
    assert np.all(np.asarray(L.kl(logp, ref, "k3")) >= 0.0)
    np.testing.assert_array_equal(np.asarray(L.kl(logp, logp, "k3")), 0.0)


def test_kl_bad_estimator():
    with pytest.raises(ValueError, match="unknown estimator 'k4'"):
        L.kl(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k4")


def _reference(h, w, tokens, temperature):
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
    lse = sp.logsumexp(z, axis=-1)
    p = np.exp(z - lse[..., None])
    logp = np.take_along_axis(z, np.asarray(tokens)[..., None], -1)[..., 0] - lse
    return logp, lse - (p * z).sum(-1)


@pytest.mark.parametrize("chunk, temperature", [(4, 1.0), (3, 0.7), (64, 1.3)])
def test_chunked_kernel_matches_reference(chunk, temperature):
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (3, 10, 32))
    w = jax.random.normal(k[1], (32, 300)) * 0.5
    t = jax.random.randint(k[2], (3, 10), 0, 300)
    logp, ent = L.token_logprobs_and_entropy(h, w, t, chunk=chunk, temperature=temperature)
    ref_logp, ref_ent = _reference(h, w, t, temperature)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=1e-5)
    np.testing.assert_allclose(np.asarray(L.entropy_from_logits(jnp.asarray(
        np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature, jnp.float32))), ref_ent, atol=1e-5)
    np.testing.assert_allclose(np.asarray(L.logprobs_from_logits(h @ w, t, temperature)), ref_logp, atol=1e-5)


@pytest.mark.parametrize("row_blocks", [1, 2, 3])  # 3 does not divide the rows: one block
def test_chunked_kernel_gradient_matches_naive(row_blocks):
    k = jax.random.split(jax.random.key(1), 5)
    h = jax.random.normal(k[0], (4, 9, 16))
    w = jax.random.normal(k[1], (16, 40)) * 0.5
    t = jax.random.randint(k[2], (4, 9), 0, 40)
    a = jax.random.normal(k[3], (4, 9))
    b = jax.random.normal(k[4], (4, 9))

    def naive(h, w):
        z = jnp.einsum("btd,dv->btv", h, w, precision="highest") / 0.8
        lp = jax.nn.log_softmax(z)
        return jnp.take_along_axis(lp, t[..., None], -1)[..., 0], L.entropy_from_logits(z)

    def objective(fn):
        def f(h, w):
            logp, ent = fn(h, w)
            return jnp.sum(a * logp) + jnp.sum(b * ent)
        return f

    def chunked(h, w):
        return L.token_logprobs_and_entropy(h, w, t, chunk=4, temperature=0.8, row_blocks=row_blocks)
    g1 = jax.grad(objective(chunked), argnums=(0, 1))(h, w)
    g2 = jax.grad(objective(naive), argnums=(0, 1))(h, w)
    for x, y in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4)


def test_chunked_kernel_bf16_inputs_give_fp32_outputs():
    h = jnp.ones((1, 3, 8), jnp.bfloat16)
    w = jnp.ones((8, 5), jnp.bfloat16)
    logp, ent = L.token_logprobs_and_entropy(h, w, jnp.zeros((1, 3), jnp.int32))
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), np.log(1 / 5), rtol=1e-6)


def test_chunked_kernel_bad_input():
    h = jnp.zeros((1, 3, 8))
    with pytest.raises(ValueError, match="unembed"):
        L.token_logprobs_and_entropy(h, jnp.zeros((4, 5)), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        L.token_logprobs_and_entropy(h, jnp.zeros((8, 5)), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="temperature"):
        L.token_logprobs_and_entropy(h, jnp.zeros((8, 5)), jnp.zeros((1, 3), jnp.int32), temperature=0.0)
