"""Routed mixture of experts (models/moe.py) against evaluating every expert for every token: values and gradients,
forced routings, skewed loads, sharding over fake devices, tile plans, XLA's FLOP count."""
import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_llm.models import Decoder, ModelConfig, moe
from jaxrl_llm.models.layers import MoE
from jaxrl_llm.parallel import make_mesh, shard_model


def dense_moe(x, router, gate, up, down, k, norm_topk_prob, forced=None):
    """The layer as it was: router softmax in float32, top-k (or the forced experts), every expert evaluated for
    every token and combined with the gate weights (zero for the experts not chosen). The gate weights are the
    probabilities masked to the chosen experts (counted as often as chosen), renormalised over the experts."""
    logits = jnp.einsum("btd,de->bte", x, router).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    chosen = jax.lax.top_k(probs, k)[1] if forced is None else forced.astype(jnp.int32)
    times_chosen = jnp.sum(jax.nn.one_hot(chosen, gate.shape[0], dtype=jnp.float32), axis=-2)
    weights = probs * times_chosen
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    g = jnp.einsum("btd,edf->btef", x, gate)
    u = jnp.einsum("btd,edf->btef", x, up)
    y = jnp.einsum("btef,efd->bted", jax.nn.silu(g) * u, down)
    return jnp.einsum("bted,bte->btd", y, weights.astype(x.dtype)), logits, chosen


def routed_moe(x, router, gate, up, down, k, norm_topk_prob, forced=None):
    return moe.moe_forward(x, router, gate, up, down, k=k, norm_topk_prob=norm_topk_prob, forced_experts=forced)


def _params(seed, e, d=16, f=12, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (d, e)).astype(dtype), (0.3 * jax.random.normal(ks[1], (e, d, f))).astype(dtype),
            (0.3 * jax.random.normal(ks[2], (e, d, f))).astype(dtype),
            (0.3 * jax.random.normal(ks[3], (e, f, d))).astype(dtype))


def _x(seed, b=3, t=7, d=16, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(100 + seed), (b, t, d)).astype(dtype)


def _loss(fn, k, norm, forced):
    def loss(x, router, gate, up, down):
        out, logits, _ = fn(x, router, gate, up, down, k, norm, forced)
        # the logits term reaches the router through the softmax directly, the output term through the gate weights
        return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(jnp.tanh(logits))
    return jax.jit(jax.value_and_grad(loss, argnums=range(5)))


def _assert_same(routed, dense, atol=1e-5):
    for a, b in zip(jax.tree.leaves(routed), jax.tree.leaves(dense)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def _check(args, k, norm, forced=None):
    out, logits, top_i = jax.jit(routed_moe, static_argnums=(5, 6))(*args, k, norm, forced)
    ref, ref_logits, ref_i = dense_moe(*args, k, norm, forced)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))
    np.testing.assert_array_equal(np.asarray(top_i), np.asarray(ref_i))
    _assert_same(_loss(routed_moe, k, norm, forced)(*args), _loss(dense_moe, k, norm, forced)(*args))


@pytest.mark.parametrize("experts,k,norm", [(4, 2, True), (8, 3, False), (16, 4, True), (5, 5, False), (6, 1, True)])
def test_routed_equals_dense(experts, k, norm):
    _check((_x(experts), *_params(experts, experts)), k, norm)


@pytest.mark.parametrize("norm", [True, False])
def test_forced_experts_equal_dense(norm):
    # routing replay: any distinct experts, and the gate weights are the router's probabilities there
    e, k = 8, 3
    forced = jax.vmap(lambda key: jax.random.permutation(key, e)[:k])(jax.random.split(jax.random.key(5), 21))
    _check((_x(1), *_params(1, e)), k, norm, forced.reshape(3, 7, k))


def test_all_tokens_on_the_same_experts_and_empty_experts():
    # every token to experts 5 and 2: those tiles take the whole batch, the six others stay empty
    e, k = 8, 2
    forced = jnp.broadcast_to(jnp.array([5, 2], jnp.int32), (3, 7, k))
    args = (_x(2), *_params(2, e))
    _check(args, k, True, forced)
    _, grads = _loss(routed_moe, k, True, forced)(*args)
    for g in grads[2:]:  # expert weights: nothing flows to the unused experts
        assert np.all(np.asarray(g)[[0, 1, 3, 4, 6, 7]] == 0) and np.any(np.asarray(g)[[2, 5]] != 0)


def test_one_token_per_row_like_a_decode_step():
    _check((_x(3, b=5, t=1), *_params(3, 16)), 4, True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.permutations(range(6)), min_size=20, max_size=20), st.integers(0, 20))
def test_any_routing_equals_dense(perms, crowded):
    # hypothesis over routings (fixed shapes: one compile): each token's 3 distinct experts of 6, the first
    # `crowded` tokens all on experts 0, 1, 2 (a crowded tile run; with 20, experts 3, 4, 5 empty)
    forced = np.array([[0, 1, 2] if i < crowded else p[:3] for i, p in enumerate(perms)], np.int32)
    args = (_x(4, b=4, t=5), *_params(4, 6))
    out = _routed_jit(*args, jnp.asarray(forced.reshape(4, 5, 3)))
    ref = dense_moe(*args, 3, True, jnp.asarray(forced.reshape(4, 5, 3)))[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@jax.jit
def _routed_jit(x, router, gate, up, down, forced):
    return routed_moe(x, router, gate, up, down, 3, True, forced)[0]


def test_tile_plan_by_hand():
    # assignments (token * k + j): 0 -> e0, 1 -> e2, 2 -> e2, 3 -> e1, 4 -> e0, 5 -> e2; 6 assignments, 3 experts:
    # tiles of 8 rows (the minimum), at most (6 + 3 * 7) // 8 = 3 tiles
    experts = jnp.array([[0, 2], [2, 1], [0, 2]], jnp.int32)
    plan = moe.plan_tiles(experts, 3)
    assert plan.tile == 8 and int(plan.tiles_used) == 3
    np.testing.assert_array_equal(plan.tile_expert, [0, 1, 2])
    pad = [6] * 8
    np.testing.assert_array_equal(plan.row_assign, ([0, 4] + pad)[:8] + ([3] + pad)[:8] + ([1, 2, 5] + pad)[:8])
    np.testing.assert_array_equal(plan.row_token, ([0, 2] + [3] * 8)[:8] + ([1] + [3] * 8)[:8]
                                  + ([0, 1, 2] + [3] * 8)[:8])
    # the device holding experts 1 and 2 only: 2 tiles at most, expert 0's assignments are not tiled
    local = moe.plan_tiles(experts, 2, first=1)
    assert int(local.tiles_used) == 2 and local.tile_expert.shape == (2,)
    np.testing.assert_array_equal(local.row_assign, ([3] + pad)[:8] + ([1, 2, 5] + pad)[:8])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=24, max_size=24), st.integers(0, 9), st.integers(1, 10))
def test_tile_plan_places_every_local_assignment_once(flat, first, num_local):
    experts = np.array(flat, np.int32).reshape(12, 2)
    plan = _plan_jit(jnp.asarray(experts), num_local, first)
    tiles, tile = plan.tile_expert.shape[0], plan.tile
    local = np.flatnonzero((experts.reshape(-1) >= first) & (experts.reshape(-1) < first + num_local))
    rows = np.asarray(plan.row_assign)
    placed = rows[rows < 24]
    np.testing.assert_array_equal(np.sort(placed), local)  # each local assignment once, no other
    assert int(plan.tiles_used) <= tiles == (24 + num_local * (tile - 1)) // tile
    row_expert = np.repeat(np.asarray(plan.tile_expert), tile)
    ok = rows < 24
    np.testing.assert_array_equal(row_expert[ok], experts.reshape(-1)[rows[ok]] - first)  # tile of its expert
    np.testing.assert_array_equal(np.asarray(plan.row_token)[ok], rows[ok] // 2)
    np.testing.assert_array_equal(np.asarray(plan.row_token)[~ok], 12)  # padding points past the tokens
    # experts in order, and within an expert the assignments in token order (a stable sort)
    same = np.diff(row_expert[ok]) == 0
    assert np.all(np.diff(row_expert[ok]) >= 0) and np.all(np.diff(rows[ok])[same] > 0)


_plan_jit = jax.jit(moe.plan_tiles, static_argnums=(1,))


def test_tile_rows():
    assert moe.tile_rows(8, 4) == 8  # small loads: the minimum
    assert moe.tile_rows(8192, 64) == 32  # 32 rows per expert on average: padding at most a quarter
    assert moe.tile_rows(1 << 20, 8) == 128  # the maximum


def test_static_tile_loops_same_numbers_and_fewer_flops():
    # the benchmark's FLOP count runs every tile of the bound unrolled: same outputs, and XLA counts
    # about N k + E (T - 1) rows of expert products, against N E for dense evaluation
    e, k, d, f = 16, 2, 64, 48  # wide enough for the products to outweigh routing and elementwise work
    args = (_x(6, b=4, t=16, d=d), *_params(6, e, d, f))
    fn = lambda *a: routed_moe(*a, k, True)[0]  # noqa: E731
    with moe.static_tile_loops():  # traced inside
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    np.testing.assert_allclose(np.asarray(lowered.compile()(*args)), np.asarray(jax.jit(fn)(*args)), atol=1e-6)
    n = 64
    tile = moe.tile_rows(n * k, e)
    product = 2 * d * f * 3  # gate, up and down products per row
    routed = lowered.compile().cost_analysis()["flops"]
    dense = jax.jit(lambda *a: dense_moe(*a, k, True)[0]).lower(*args).compile().cost_analysis()["flops"]
    bound = (n * k + e * (tile - 1)) * product
    assert bound <= routed <= 1.15 * bound
    assert dense >= n * e * product and routed < dense / 2


def test_static_tile_loops_same_gradients():
    args = (_x(10, b=2, t=4), *_params(10, 4))
    dynamic = _loss(routed_moe, 2, True, None)(*args)
    with moe.static_tile_loops():
        static = _loss(routed_moe, 2, True, None)(*args)
    _assert_same(static, dynamic, atol=1e-6)


def test_bfloat16_close_to_dense():
    args = (_x(7, dtype=jnp.bfloat16), *_params(7, 8, dtype=jnp.bfloat16))
    out = jax.jit(lambda *a: routed_moe(*a, 2, True)[0])(*args)
    ref = dense_moe(*args, 2, True)[0]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.05, rtol=0.05)
    grads = _loss(routed_moe, 2, True, None)(*args)[1]
    assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def _moe_layer(e=8, k=2):
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=8, num_experts=e, num_experts_per_tok=k,
                      moe_intermediate_size=12, norm_topk_prob=True)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    for name in ("gate", "up", "down"):  # larger than the initialisation's 0.02, so that differences show
        getattr(layer, name)[...] = getattr(layer, name)[...] * 20
    return layer


def _layer_loss(layer, x):
    out, logits, experts = layer(x)
    return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(jnp.tanh(logits)), experts


@pytest.mark.slow
@pytest.mark.parametrize("axes", [{"expert": 2, "data": 4}, {"expert": 4, "data": 2}, {"data": 2, "expert": 2, "fsdp": 2},
                                  {"data": 2, "tensor": 2, "expert": 2}, {"fsdp": 8}])
def test_sharded_equals_unsharded(axes):
    x = _x(8, b=8, t=6)
    grad = nnx.jit(nnx.value_and_grad(_layer_loss, has_aux=True))
    (ref_loss, ref_experts), ref_grads = grad(_moe_layer(), x)
    mesh = make_mesh(axes)
    layer = shard_model(_moe_layer(), mesh)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    # traced under the mesh (trainer) and without a mesh context (sampler: the mesh comes from the weights)
    for context in (jax.set_mesh(mesh), contextlib.nullcontext()):
        with context:
            (loss, experts), grads = nnx.jit(nnx.value_and_grad(_layer_loss, has_aux=True))(layer, xs)
        np.testing.assert_array_equal(np.asarray(experts), np.asarray(ref_experts))
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        _assert_same(grads, ref_grads, atol=2e-6)


def test_each_device_routes_its_own_rows():
    # rows split 4 ways over `data` x `fsdp`, experts 2 ways: every device sorts its 12 x 2 = 24 assignments only
    # (left to GSPMD, the sort of all 96 would run on every device), and the expert-sharded product needs no
    # all-to-all, only the all-reduce of the partial outputs
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    layer = shard_model(_moe_layer(), mesh)
    xs = jax.device_put(_x(9, b=8, t=6), NamedSharding(mesh, P(("data", "fsdp"))))
    graphdef, state = nnx.split(layer)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, xs).compile().as_text()
    sorted_sizes = {int(n) for n in re.findall(r"\(s32\[(\d+)\]\{0\}, s32\[\d+\]\{0\}\) sort\(", hlo)}
    assert sorted_sizes == {24}
    assert "all-to-all" not in hlo and "all-reduce" in hlo


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_decoder_gradients_with_remat(remat):
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=12)
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))

    def grads(remat):
        model = Decoder(cfg, rngs=nnx.Rngs(0), remat=remat)
        return nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(tokens, positions).hidden))))(model)

    # recomputation rounds differently (the embedding gradient sums every path): 1e-5 of values around 1
    _assert_same(grads(remat), grads("none"), atol=2e-5)
