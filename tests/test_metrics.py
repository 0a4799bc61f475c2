"""pass@k against brute-force enumeration of subsets."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_llm.metrics import mean_pass_at_k, pass_at_k, summarize


def _brute(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12)


def test_pass_at_1_is_accuracy_and_known_value():
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    # 1 - C(12,2)/C(16,2) = 1 - 66/120
    assert pass_at_k(16, 4, 2) == pytest.approx(0.45)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0


def test_mean_pass_at_k_and_errors():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0]])
    out = mean_pass_at_k(correct, [1, 4])
    assert out[1] == pytest.approx(0.125) and out[4] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k=8"):
        mean_pass_at_k(correct, [8])
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="not a scalar"):
        summarize({"x": np.zeros(3)})
    assert summarize({"a": np.float32(2.5)}) == {"a": 2.5}
