"""Advantage estimators: paper check values, brute-force pass@k, shaping."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_llm import advantages as A


def test_gae_check_values():
    r = jnp.array([[0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.6, 0.7]])
    m = jnp.ones((1, 3), bool)
    adv, ret = A.gae(r, v, m, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.4, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]], atol=1e-6)
    adv, ret = A.gae(r, v, m, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(adv, [[0.46575, 0.385, 0.3]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.96575, 0.985, 1.0]], atol=1e-6)


def test_gae_ignores_padding_and_matches_loop():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    lengths = [6, 4, 1]
    m = np.arange(6)[None] < np.array(lengths)[:, None]
    adv, _ = A.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expect, running = np.zeros(6), 0.0
        for t in reversed(range(n)):
            nv = v[i, t + 1] if t + 1 < n else 0.0
            running = r[i, t] + 0.9 * nv - v[i, t] + 0.9 * 0.8 * running
            expect[t] = running
        np.testing.assert_allclose(np.asarray(adv[i]), expect, atol=1e-5)


def test_group_advantages_check_values():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(A.grpo(r), [[0.866025, -0.866025, -0.866025, 0.866025]], atol=2e-6)
    np.testing.assert_allclose(A.grpo(r, scale_by_std=False), [[0.5, -0.5, -0.5, 0.5]])
    np.testing.assert_array_equal(A.grpo(jnp.ones((1, 4))), 0.0)
    np.testing.assert_allclose(A.rloo(r), (4 / 3) * np.array([[0.5, -0.5, -0.5, 0.5]]), rtol=1e-6)
    # singleton group: mean 0, std 1
    np.testing.assert_allclose(A.grpo(jnp.array([[0.7]])), [[0.7 / (1 + 1e-6)]], rtol=1e-6)
    assert list(np.asarray(A.informative_groups(jnp.array([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])))) == [
        True, False, False]


def test_reinforce_pp_variants():
    r = jnp.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    out = np.asarray(A.reinforce_pp_baseline(r))
    centred = np.array([[0.5, -0.5], [0, 0], [0, 0]])
    np.testing.assert_allclose(out, centred / np.sqrt(centred.var() + 1e-8), rtol=1e-5)
    tok = jnp.array([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    m = jnp.array([[True, True, True], [True, True, False]])
    adv = np.asarray(A.reinforce_pp(tok, m, gamma=0.5))
    returns = np.array([0.5, 1.0, 2.0, 0.5, 1.0])  # discounted returns-to-go of the valid tokens
    expect = (returns - returns.mean()) / np.sqrt(returns.var() + 1e-8)
    np.testing.assert_allclose(adv[np.asarray(m)], expect, rtol=1e-5)
    assert adv[1, 2] == 0.0


def _passk_brute(rewards, k):
    n = len(rewards)
    subsets = list(itertools.combinations(range(n), k))
    vals = np.array([max(rewards[i] for i in s) for s in subsets], float)
    mean, std = vals.mean(), vals.std()
    if std == 0:
        return np.zeros(n)
    norm = (vals - mean) / std
    return np.array([np.mean([norm[j] for j, s in enumerate(subsets) if i in s]) for i in range(n)])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 1), min_size=n, max_size=n),
                                                     st.integers(1, n))))
def test_passk_matches_subset_enumeration(case):
    rewards, k = case
    got = np.asarray(A.passk(jnp.asarray([rewards], jnp.float32), k=k))[0]
    np.testing.assert_allclose(got, _passk_brute(rewards, k), atol=1e-5)


def test_passk_k1_is_population_std_grpo():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0, 1.0]])
    c = np.asarray(r) - np.asarray(r).mean()
    np.testing.assert_allclose(A.passk(r, k=1), c / np.asarray(r).std(), rtol=1e-5)


def test_overlong_penalty_check_values():
    p = A.overlong_penalty(np.array([16384, 18432, 20480, 20481]), max_len=20480, cache_len=4096)
    np.testing.assert_allclose(p, [0.0, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(A.overlong_penalty(np.array([50, 110]), max_len=100, cache_len=20), [0.0, -1.0])
    np.testing.assert_allclose(A.overlong_penalty(jnp.array([90]), max_len=100, cache_len=20), [-0.5])


def test_broadcast_and_errors():
    m = jnp.array([[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(A.broadcast_over_tokens(jnp.array([2.0, -1.0]), m),
                                  [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="values must have shape"):
        A.broadcast_over_tokens(jnp.array([1.0]), m)
    with pytest.raises(ValueError, match="rewards must be"):
        A.grpo(jnp.ones(4))
    with pytest.raises(ValueError, match="cache_len"):
        A.overlong_penalty(np.array([1]), max_len=10, cache_len=20)
    with pytest.raises(ValueError, match="k must be"):
        A.passk(jnp.ones((1, 4)), k=5)
    with pytest.raises(ValueError, match="gamma"):
        A.gae(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.ones((1, 2), bool), gamma=1.5)
