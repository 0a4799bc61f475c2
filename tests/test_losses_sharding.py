"""Every loss and its gradient under jit with the batch sharded over an 8-device `data` axis equals the
single-device value."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxrl_llm.losses as L


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("the sharding tests need 8 devices (tests/conftest.py sets XLA_FLAGS)")
    return Mesh(np.array(jax.devices()[:8]), ("data",))


def _inputs(seed=0, b=16, t=12):
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(1.0, 0.5, (b, t)))
    old = logp + rng.normal(0, 0.3, (b, t))
    adv = np.repeat(rng.normal(0, 1, (b, 1)), t, axis=1)
    mask = rng.random((b, t)) < 0.8
    w = rng.uniform(0.5, 1.5, (b, t))
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return f(logp), f(old), f(adv), jnp.asarray(mask), f(w)


CASES = [(name, agg) for name in L.POLICY_LOSSES for agg in ("token-mean", "seq-mean-token-mean")]


@pytest.mark.parametrize("name, agg", CASES)
def test_policy_loss_sharded_equals_single_device(mesh, name, agg):
    logp, old, adv, mask, w = _inputs()
    fn = L.POLICY_LOSSES[name]

    def f(lp, old, adv, mask, w):
        return fn(lp, old, adv, mask, agg=agg, is_weights=w)

    vg = jax.jit(jax.value_and_grad(f, has_aux=True))
    (v1, m1), g1 = vg(logp, old, adv, mask, w)
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, shard) for x in (logp, old, adv, mask, w)]
    (v2, m2), g2 = vg(*args)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-6, atol=1e-7)
    for key in m1:
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-6, atol=1e-7)


def test_kl_value_and_chunked_kernel_sharded(mesh):
    logp, old, adv, mask, _ = _inputs()
    shard = NamedSharding(mesh, P("data"))

    def f(lp, ref, old, adv, mask):
        kl = L.aggregate(L.kl(lp, ref, "k3"), mask, "token-mean")
        vl, _ = L.value_loss(lp, old, adv, mask, clip=0.2)
        return kl + vl

    vg = jax.jit(jax.value_and_grad(f))
    v1, g1 = vg(logp, old, old, adv, mask)
    v2, g2 = vg(*[jax.device_put(x, shard) for x in (logp, old, old, adv, mask)])
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-6, atol=1e-7)

    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (16, 6, 8))
    w = jax.random.normal(k[1], (8, 32))
    t = jax.random.randint(k[2], (16, 6), 0, 32)

    def g(h, w, t):
        lp, ent = L.token_logprobs_and_entropy(h, w, t, chunk=4)
        return jnp.sum(lp) + jnp.sum(ent)

    gg = jax.jit(jax.value_and_grad(g, argnums=(0, 1)))
    a = gg(h, w, t)
    b = gg(jax.device_put(h, shard), w, jax.device_put(t, shard))
    np.testing.assert_allclose(float(b[0]), float(a[0]), rtol=1e-6)
    for x, y in zip(a[1], b[1]):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_chunked_kernel_computes_only_its_own_rows_logits_on_an_fsdp_mesh():
    """Rows split over ``fsdp`` meet an unembedding split over ``fsdp`` (its hidden dimension). Left to itself, the
    partitioner gathers the rows (here after a replicated index, as response packing makes one) and every device
    computes the whole batch's logits: compiled temporaries then exceed one chunk of the whole batch's logits.
    With the row blocks placed, each device holds its own rows' chunk only; values and gradients unchanged."""
    from jaxrl_llm import parallel
    from jaxrl_llm.sampling.score import token_stats

    b, t, d, v, chunk = 8, 512, 256, 16384, 256
    layout = parallel.Layout(parallel.make_mesh({"fsdp": 8}))
    k = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (d, v)) * 0.1
    toks = jax.random.randint(k[2], (b, t), 0, v)

    def objective(placed):
        def f(h, w, toks):
            h = parallel.constrain_rows(h)[jnp.arange(b)[::-1]]
            # placed: the function the update, scoring and layer-entropy passes call
            read_out = token_stats if placed else L.token_logprobs_and_entropy
            lp, ent = read_out(h, w, toks, chunk=chunk, temperature=1.0)
            return jnp.sum(lp) + 0.1 * jnp.sum(ent)
        # the gradient alone: returning the value too happens to steer this small case's partitioning right
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    whole_chunk_logits = b * chunk * v * 4
    temps, values = {}, {}
    with layout.active():
        args = (jax.device_put(h, layout.rows()), jax.device_put(w, NamedSharding(layout.mesh, P("fsdp"))),
                jax.device_put(toks, layout.rows()))
        for placed in (False, True):
            fn = objective(placed)
            temps[placed] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
            values[placed] = fn(*args)
    assert temps[False] > whole_chunk_logits  # the failure this guards against happens
    assert temps[True] < whole_chunk_logits / 2, (temps, whole_chunk_logits)  # one row: 1/8 of it, plus the weights
    reference = objective(False)(h, w, toks)  # one device
    for x, y in zip(values[True], reference):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
