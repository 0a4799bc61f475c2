import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.trainer.optim import make_optimizer, make_schedule


def test_warmup_then_cosine_values():
    sched = make_schedule(1.0, steps=10, warmup_steps=2, schedule="cosine")
    assert float(sched(0)) == 0.0
    assert float(sched(1)) == pytest.approx(0.5)
    assert float(sched(2)) == pytest.approx(1.0)
    # halfway through the 8 decay steps the cosine is at one half
    assert float(sched(6)) == pytest.approx(0.5, abs=1e-6)
    assert float(sched(10)) == pytest.approx(0.0, abs=1e-6)


def test_linear_and_constant():
    lin = make_schedule(2.0, steps=5, schedule="linear")
    assert [round(float(lin(i)), 6) for i in range(6)] == [2.0, 1.6, 1.2, 0.8, 0.4, 0.0]
    const = make_schedule(3e-4, steps=5, warmup_steps=0)
    assert float(const(4)) == pytest.approx(3e-4)


def test_clipping_bounds_update_of_first_adam_step():
    opt = make_optimizer(0.1, steps=10, grad_clip=1.0)
    params = {"w": jnp.zeros(4)}
    state = opt.init(params)
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50 -> clipped to 1
    clipped = optax.clip_by_global_norm(1.0).update(grads, optax.clip_by_global_norm(1.0).init(params))[0]
    np.testing.assert_allclose(np.linalg.norm(clipped["w"]), 1.0, rtol=1e-6)
    updates, _ = opt.update(grads, state, params)
    # Adam's first step moves each coordinate by ~lr * sign(g)
    np.testing.assert_allclose(np.asarray(updates["w"])[:2], [-0.1, -0.1], rtol=1e-4)


def test_bad_values():
    with pytest.raises(ValueError, match="train.schedule"):
        make_schedule(1.0, steps=1, schedule="step")
    with pytest.raises(ValueError, match="train.lr"):
        make_schedule(0.0, steps=1)
