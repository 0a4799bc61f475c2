"""Aggregation modes: hand-computed values and additivity over micro-batches with a global normaliser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxrl_llm.losses as L

X = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
M = jnp.array([[True, True, True, False], [True, False, False, False]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),
        ("token-sum", 10.0),
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),
        ("seq-mean-token-sum-norm", (6.0 / 4 + 4.0 / 4) / 2),  # constant = padded length T = 4
    ],
)
def test_hand_values(mode, expected):
    assert float(L.aggregate(X, M, mode)) == pytest.approx(expected)


def test_dr_grpo_constant_and_empty_rows():
    assert float(L.aggregate(X, M, "seq-mean-token-sum-norm", constant=10.0)) == pytest.approx((0.6 + 0.4) / 2)
    # an all-padding row is not a sequence
    x = jnp.concatenate([X, jnp.ones((1, 4))])
    m = jnp.concatenate([M, jnp.zeros((1, 4), bool)])
    assert float(L.aggregate(x, m, "seq-mean-token-mean")) == pytest.approx(3.0)
    assert float(L.aggregate(x, jnp.zeros_like(m), "token-mean")) == 0.0


_agg_grad = jax.jit(jax.grad(lambda x, m, n, mode: L.aggregate(jnp.square(x), m, mode, normalizer=n)),
                    static_argnums=3)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(L.AGG_MODES), st.sampled_from([1, 2, 4, 8]))
def test_micro_batch_split_is_additive(seed, mode, num_micro):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.6)
    norm = L.global_normalizer(mask, mode)
    full = L.aggregate(jnp.square(x), mask, mode)
    parts = [L.aggregate(jnp.square(xc), mc, mode, normalizer=norm)
             for xc, mc in zip(jnp.split(x, num_micro), jnp.split(mask, num_micro))]
    np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-5, atol=1e-7)
    g_full = _agg_grad(x, mask, norm, mode)
    g_parts = jnp.concatenate([_agg_grad(xc, mc, norm, mode)
                               for xc, mc in zip(jnp.split(x, num_micro), jnp.split(mask, num_micro))])
    np.testing.assert_allclose(np.asarray(g_parts), np.asarray(g_full), rtol=1e-5, atol=1e-7)


def test_bad_mode_and_shapes():
    with pytest.raises(ValueError, match="unknown mode"):
        L.aggregate(X, M, "sum")
    with pytest.raises(ValueError, match="mask has shape"):
        L.aggregate(X, M[:, :2])
    with pytest.raises(ValueError, match="constant"):
        L.aggregate(X, M, "seq-mean-token-sum-norm", constant=0.0)
