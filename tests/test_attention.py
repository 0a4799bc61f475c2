"""Attention kernels against the dense reference (values and gradients; padding, packed segments with a cached
prefix, GQA, lengths that are not whole blocks), decoding over the filled key blocks, the model with each kernel
against transformers and against itself, remat's compiled memory, and errors.

Tolerances: float32 inputs, every kernel within 1e-5 (absolute) of dense on outputs and gradients. bfloat16
inputs: both dense and blockwise are compared with the float32 reference; each is within 5e-2 of it, and blockwise
no further than twice dense's own error plus 1e-2 (the two round probabilities to bfloat16 at different points:
dense after normalising, blockwise before, per key block).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from jaxrl_llm.models import Decoder, ModelConfig, init_cache, left_pad_positions, load_hf
from jaxrl_llm.models import attention as A
from jaxrl_llm.models import fused_attention as F
from model_helpers import hf_outputs, padded_batch, random_hf_model

PREFIX = 20  # cached prompt slots before the queries


def _kernel(name):
    """The kernels under test as ``fn(q, k, v, mask, cache, dt)``: splash in Pallas interpret mode and cuDNN's
    call with ``implementation="xla"`` (the same public function; the CPU has neither accelerator)."""
    if name == "splash":
        return lambda q, k, v, m, c, dt: F.splash_attention(q, k, v, m, cache=c, dt=dt, interpret=True)
    if name == "cudnn":
        return lambda q, k, v, m, c, dt: F.cudnn_attention(q, k, v, m, cache=c, dt=dt, implementation="xla")
    return lambda q, k, v, m, c, dt: A.attend(name, q, k, v, m, cache=c, dt=dt)


def _case(t, *, cached, segments, kv=2, g=2, d=16, batch=2, seed=0, dtype=jnp.float32):
    """Random queries/keys/values, a mask with left padding (row 0), packed segments with empty slots (when
    ``segments``), and with ``cached`` a KV cache holding a left-padded prompt of ``PREFIX`` slots before them.

    Returns ``(q, k, v, cache or None, mask, weights)``; ``weights`` is zero at queries that see nothing (their
    outputs are unspecified and never used)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    q, k, v = normal(batch, t, kv, g, d), normal(batch, t, kv, d), normal(batch, t, kv, d)
    valid = np.ones((batch, t), bool)
    valid[0, :min(5, t - 1)] = False  # left padding
    seg = None
    if segments:
        seg = np.ones((batch, t), np.int32)
        seg[1, t // 2:] = 2
        seg[1, max(t - 3, t // 2 + 1):] = 0  # empty slots at the end
        seg[0, max(t - 2, 6):] = 3
        valid &= seg > 0
    if not cached:
        mask = A.AttentionMask(q_offset=jnp.zeros((), jnp.int32), k_valid=jnp.asarray(valid),
                               q_segment=None if seg is None else jnp.asarray(seg),
                               k_segment=None if seg is None else jnp.asarray(seg))
        cache = None
    else:
        slots = PREFIX + t + 11  # room for more tokens, as the sampler's cache has
        cache = (normal(batch, kv, d, slots), normal(batch, kv, slots, d))
        k_valid = np.zeros((batch, slots), bool)
        k_valid[:, 3:PREFIX] = True  # the cached prompt, left-padded
        k_valid[:, PREFIX:PREFIX + t] = valid
        k_seg = None
        if seg is not None:
            k_seg = np.zeros((batch, slots), np.int32)
            k_seg[:, PREFIX:PREFIX + t] = seg
        mask = A.AttentionMask(q_offset=jnp.asarray(PREFIX, jnp.int32), k_valid=jnp.asarray(k_valid),
                               q_segment=None if seg is None else jnp.asarray(seg),
                               k_segment=None if k_seg is None else jnp.asarray(k_seg))
    # every valid query sees at least itself
    weights = normal(batch, t, kv, g, d) * jnp.asarray(valid, dtype)[:, :, None, None, None]
    return q, k, v, cache, mask, weights


def _with_cache_written(fn, mask):
    """``fn`` called as the model calls it: this call's keys/values written into the cache first."""
    def call(q, k, v, cache, dt):
        if cache is not None:
            cache = (jax.lax.dynamic_update_slice_in_dim(cache[0], k.transpose(0, 2, 3, 1).astype(cache[0].dtype),
                                                         mask.q_offset, 3),
                     jax.lax.dynamic_update_slice_in_dim(cache[1], v.transpose(0, 2, 1, 3).astype(cache[1].dtype),
                                                         mask.q_offset, 2))
        return fn(q, k, v, mask, cache, dt)
    return call


def _values_and_grads(name, case, dt=jnp.float32):
    q, k, v, cache, mask, weights = case
    fn = _with_cache_written(_kernel(name), mask)

    def loss(q, k, v, cache):
        return jnp.sum(fn(q, k, v, cache, dt).astype(jnp.float32) * weights)
    out = jax.jit(fn, static_argnums=4)(q, k, v, cache, dt)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, cache)
    return np.asarray(out, np.float32), [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)]


def _sees(case):
    return np.asarray(case[5][..., 0, 0, 0] != 0)


@pytest.mark.parametrize("name", ["blockwise", "cudnn", pytest.param("splash", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cached,segments", [(False, False), (False, True), (True, False), (True, True)])
def test_kernels_equal_dense_values_and_gradients(name, cached, segments):
    # 200 queries: one block and a part (odd length); GQA with 2 query heads per key/value head
    case = _case(200 if name != "splash" else 37, cached=cached, segments=segments)
    out, grads = _values_and_grads(name, case)
    ref_out, ref_grads = _values_and_grads("dense", case)
    sees = _sees(case)
    assert np.abs(out - ref_out)[sees].max() <= 1e-5
    assert len(grads) == len(ref_grads) == (5 if cached else 3)  # q, k, v (and the cache's keys and values)
    for got, want in zip(grads, ref_grads):
        assert np.abs(got - want).max() <= 1e-5
        assert np.abs(want).max() > 1e-2  # the gradient is not trivially zero


def test_blockwise_bf16_bound():
    case32 = _case(300, cached=True, segments=True, seed=3)
    case16 = tuple(x if not hasattr(x, "astype") or x.dtype != jnp.float32 else x.astype(jnp.bfloat16)
                   for x in case32[:3]) + (jax.tree.map(lambda x: x.astype(jnp.bfloat16), case32[3]),) + case32[4:]
    ref, _ = _values_and_grads("dense", case32)
    sees = _sees(case32)
    dense_err = np.abs(_values_and_grads("dense", case16, jnp.bfloat16)[0] - ref)[sees].max()
    block_err = np.abs(_values_and_grads("blockwise", case16, jnp.bfloat16)[0] - ref)[sees].max()
    print(f"bf16 max |error| vs float32 dense: dense {dense_err:.2e}, blockwise {block_err:.2e}")
    assert dense_err <= 5e-2 and block_err <= 5e-2
    assert block_err <= 2 * dense_err + 1e-2


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 300), st.integers(1, 2), st.integers(1, 3), st.booleans(), st.booleans(), st.integers(0, 99))
def test_blockwise_property_equals_dense_and_ignores_what_it_cannot_see(t, kv, g, cached, segments, seed):
    case = _case(t, cached=cached, segments=segments and t >= 8, kv=kv, g=g, d=8, seed=seed)
    q, k, v, cache, mask, weights = case
    sees = _sees(case)
    call = jax.jit(_with_cache_written(_kernel("blockwise"), mask), static_argnums=4)
    out = np.asarray(call(q, k, v, cache, jnp.float32))
    ref = np.asarray(jax.jit(_with_cache_written(_kernel("dense"), mask), static_argnums=4)(q, k, v, cache,
                                                                                            jnp.float32))
    assert np.abs(out - ref)[sees].max() <= 1e-5
    # keys and values a query may not see do not change its output, bit for bit (here: the padded ones)
    hidden = ~np.asarray(mask.k_valid)[:, -t:] if not cached else ~np.asarray(mask.k_valid)[:, PREFIX:PREFIX + t]
    k2 = jnp.where(jnp.asarray(hidden)[:, :, None, None], 1e3, k)
    v2 = jnp.where(jnp.asarray(hidden)[:, :, None, None], -1e3, v)
    np.testing.assert_array_equal(np.asarray(call(q, k2, v2, cache, jnp.float32))[sees], out[sees])


@pytest.mark.parametrize("slots,filled", [(100, 1), (100, 57), (128, 128), (429, 5), (429, 127), (429, 128),
                                          (429, 129), (429, 300), (429, 390), (429, 429)])
def test_decode_reads_the_filled_blocks_only_and_equals_the_full_cache(slots, filled):
    # one query per row at slot `filled - 1` of a cache of `slots` (429: three key blocks and a cut one); the blocks
    # after it hold NaN, which the full-cache path would spread into the output (0 * NaN), so a finite result shows
    # they were not read
    rng = np.random.default_rng(filled)
    b, kv, g, d = 3, 2, 2, 16
    q = jnp.asarray(rng.normal(size=(b, 1, kv, g, d)), jnp.float32)
    k = rng.normal(size=(b, kv, d, slots)).astype(np.float32)
    v = rng.normal(size=(b, kv, slots, d)).astype(np.float32)
    valid = np.zeros((b, slots), bool)
    valid[:, :filled] = True
    valid[0, :min(3, filled - 1)] = False  # left padding
    mask = A.AttentionMask(q_offset=jnp.asarray(filled - 1, jnp.int32), k_valid=jnp.asarray(valid))
    full = jax.jit(functools.partial(A.dense_attention, cached=True, dt=jnp.float32))(q, jnp.asarray(k),
                                                                                     jnp.asarray(v), mask)
    unread = -(-filled // A.KEY_BLOCK) * A.KEY_BLOCK
    k[..., unread:], v[:, :, unread:] = np.nan, np.nan
    assert unread >= slots or np.isnan(k).any()
    got = jax.jit(functools.partial(A.decode_attention, dt=jnp.float32))(q, jnp.asarray(k), jnp.asarray(v), mask)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-6)


# ---- the whole model -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_blockwise_model_parity_with_transformers(family, tmp_path):
    hf = random_hf_model(family, seed=3)
    hf.save_pretrained(str(tmp_path))
    model, cfg = load_hf(str(tmp_path), attention="blockwise")
    ids, mask = padded_batch(cfg.vocab_size, lengths=(7, 4, 9, 150))  # 150: two key blocks
    ref = hf_outputs(hf, ids, mask)
    forward = nnx.jit(lambda m, ids, mask: m.logits(m(ids, left_pad_positions(mask), attention_mask=mask).hidden))
    logits = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(logits - ref.logits.numpy())[mask].max()
    print(f"{family} blockwise: max |logit diff| vs transformers = {diff:.3g}")
    assert diff <= 1e-4


def _tiny(attention="auto", remat="none", **kw):
    kw = dict(dict(num_layers=2, max_position_embeddings=1024), **kw)
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                      num_kv_heads=2, head_dim=8, qk_norm=True, **kw)
    return Decoder(cfg, rngs=nnx.Rngs(0), attention=attention, remat=remat)


def test_model_decode_over_several_blocks_equals_dense():
    # prefill 140 tokens (two key blocks), then decode 130 more across the third block: the blockwise prefill and the
    # filled-block decode give the logits of the dense prefill and full-cache decode
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, (2, 270)), jnp.int32)
    mask = jnp.ones((2, 270), bool).at[0, :6].set(False)
    pos = left_pad_positions(mask)

    @nnx.jit
    def step(model, ids, pos, mask, cache):
        out = model(ids, pos, attention_mask=mask, cache=cache)
        return model.logits(out.hidden), out.cache

    results = {}
    for kind in ("dense", "blockwise"):
        model = _tiny(kind)
        cache = init_cache(model.cfg, 2, 270)  # two key blocks and a cut one
        logits, cache = step(model, ids[:, :140], pos[:, :140], mask[:, :140], cache)
        steps = [logits]
        for i in range(140, 270):
            logits, cache = step(model, ids[:, i:i + 1], pos[:, i:i + 1], mask[:, i:i + 1], cache)
            steps.append(logits)
        results[kind] = np.asarray(jnp.concatenate(steps, axis=1))
    m = np.asarray(mask)
    np.testing.assert_allclose(results["blockwise"][m], results["dense"][m], atol=1e-5)


@pytest.mark.parametrize("name", ["blockwise", pytest.param("splash", marks=pytest.mark.slow)])
def test_packed_scoring_with_shared_prompts_equals_dense(name, monkeypatch):
    # the update's path: each prompt prefilled once into a cache, responses packed as segments on top of it;
    # log-probs and gradients with each kernel equal dense's
    from jaxrl_llm.sampling import Sampler, SamplingParams, sequence_logprobs
    from jaxrl_llm.trainer.packing import plan_packing

    if name == "splash":  # the model's switch, run in Pallas interpret mode on the CPU
        monkeypatch.setattr(A, "available", lambda backend=None: A.KERNELS)
        monkeypatch.setattr(F, "splash_attention", functools.partial(F.splash_attention, interpret=True))
    ref_model = _tiny("dense")
    graphdef, state = nnx.split(ref_model)
    ids = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 9, 8, 7, 6]], jnp.int32)
    pmask = ids > 0
    ro = Sampler(ref_model).generate(state, ids, pmask, SamplingParams(max_new_tokens=9, n=3, stop_tokens=(3, 4, 5)),
                                     jax.random.key(4))
    plan = plan_packing(np.asarray(ro.mask), group=3, num_micro=1, row_multiple=1)
    assert plan.src.shape[0] < ro.tokens.shape[0]  # responses share rows
    weights = jnp.linspace(-1.0, 1.0, ro.tokens.size).reshape(ro.tokens.shape)

    def objective(state, graph):
        logp, ent = sequence_logprobs(nnx.merge(graph, state), ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                      group=3, packing=plan)
        return jnp.sum(weights * logp) + 0.5 * jnp.sum(ent), logp

    results = {}
    for kind in ("dense", name):
        graph = nnx.graphdef(_tiny(kind))
        (_, logp), grads = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)(state, graph)
        results[kind] = (np.asarray(logp), [np.asarray(x) for x in jax.tree.leaves(grads)])
    np.testing.assert_allclose(results[name][0], results["dense"][0], atol=1e-5)
    for got, want in zip(results[name][1], results["dense"][1]):
        np.testing.assert_allclose(got, want, atol=1e-5)


# ---- memory ----------------------------------------------------------------------------------------------------

def _temp_bytes(model, t, *, backward=True):
    """Compiled temporary bytes of ``model``'s forward over ``t`` tokens, with its backward pass unless told not."""
    ids, mask = jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool)
    graphdef, state = nnx.split(model)

    def forward(state):
        return nnx.merge(graphdef, state)(ids, left_pad_positions(mask), attention_mask=mask).hidden

    program = jax.grad(lambda state: jnp.sum(forward(state) ** 2)) if backward else forward
    return jax.jit(program).lower(state).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "blockwise"])
def test_remat_lowers_compiled_memory(kind):
    # 8 layers, 1024 tokens, forward + backward: rematerialising each layer keeps one layer's activations at a
    # time; saving the products' outputs (dots) keeps more, still less than everything
    temp = {r: _temp_bytes(_tiny(kind, remat=r, num_layers=8), 1024) for r in ("none", "full", "dots")}
    print(kind, {r: f"{b / 2**20:.1f} MiB" for r, b in temp.items()})
    assert temp["full"] < 0.5 * temp["none"]
    assert temp["full"] < temp["dots"] < 0.75 * temp["none"]


@pytest.mark.slow
def test_recomputed_layers_do_not_hold_their_attention_gradient_accumulators():
    # with layers recomputed, each extra layer may keep its input, q, k and v (float32 here); the blockwise
    # backward's float32 dq, dk, dv accumulators are made once the layer's gradient arrives. Zeros that depend on
    # nothing are allocated at the program's start, and every layer's would live through the whole backward pass
    t, (l0, l1) = 2048, (2, 6)
    cfg = _tiny("blockwise").cfg
    temp = {n: _temp_bytes(_tiny("blockwise", remat="full", num_layers=n, max_position_embeddings=t), t)
            for n in (l0, l1)}
    per_layer = (temp[l1] - temp[l0]) / (l1 - l0)
    q = t * cfg.num_heads * cfg.head_dim * 4
    kv = t * cfg.num_kv_heads * cfg.head_dim * 4
    kept = t * cfg.hidden_size * 4 + q + 2 * kv
    accumulators = q + 2 * kv
    print(per_layer / 2**20, kept / 2**20, accumulators / 2**20)
    assert per_layer < kept + 0.5 * accumulators


def test_a_forward_pass_holds_no_layers_attention_output_past_the_layer():
    # a forward pass (scoring, prefill) needs one layer's attention output at a time. Per-block outputs stacked by a
    # loop start from a constant that XLA shares between the layers and copies for each at the program's start, so
    # that every layer's output would be held from the first layer to the last
    t, (l0, l1) = 2048, (2, 6)
    cfg = _tiny("blockwise").cfg
    temp = {n: _temp_bytes(_tiny("blockwise", num_layers=n, max_position_embeddings=t), t, backward=False)
            for n in (l0, l1)}
    per_layer = (temp[l1] - temp[l0]) / (l1 - l0)
    output = t * cfg.num_heads * cfg.head_dim * 4  # one layer's attention output, float32
    print(per_layer / 2**20, output / 2**20)
    assert per_layer < 0.25 * output


@pytest.mark.slow
def test_blockwise_memory_is_linear_in_the_length():
    # compiled temporaries of forward + backward at 1024 and 2048 tokens: dense's grow ~4x (scores), blockwise's ~2x
    growth = {}
    for kind in ("dense", "blockwise"):
        small, large = (_temp_bytes(_tiny(kind, num_layers=1, max_position_embeddings=2048), t)
                        for t in (1024, 2048))
        growth[kind] = large / small
    print(growth)
    assert growth["dense"] > 3.5 and growth["blockwise"] < 2.3


# ---- errors ----------------------------------------------------------------------------------------------------

def test_kernel_errors_name_the_key_and_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"model.attention='splash' does not run on the cpu backend; "
                                         r"available here: auto, dense, blockwise"):
        _tiny("splash")
    with pytest.raises(ValueError, match="model.attention='cudnn' does not run on the cpu backend"):
        _tiny("cudnn")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        _tiny("flash")
    monkeypatch.setattr(A, "available", lambda backend=None: A.KERNELS)
    with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype bfloat16"):
        _tiny("cudnn")  # float32
    from jaxrl_llm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.attention: got 'flash'; allowed: auto, dense, blockwise"):
        load_config(None, ["model.path=x", "model.attention=flash"])


def test_auto_choices():
    on_cpu = functools.partial(A.resolve, "auto", head_dim=64, dtype=jnp.float32, cached=True, segments=True)
    assert on_cpu(keys=A.CPU_DENSE_MAX_KEYS) == "dense"
    assert on_cpu(keys=A.CPU_DENSE_MAX_KEYS + 1) == "blockwise"
    assert A.resolve("splash", keys=8, head_dim=64, dtype=jnp.float32, cached=False, segments=False) == "splash"


def test_trainer_rejects_prompt_plus_response_beyond_the_model_positions(tiny_model_dir, tmp_path):
    from jaxrl_llm.config import load_config
    from jaxrl_llm.trainer.rl import RLTrainer

    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"log.run_dir={tmp_path}", "data.max_prompt_tokens=100",
                             "rollout.max_new_tokens=40", "log.tensorboard=false", "log.progress=false"])
    with pytest.raises(ValueError, match=r"data.max_prompt_tokens=100 \+ rollout.max_new_tokens=40 exceeds the "
                                         r"model's max_position_embeddings 128"):
        RLTrainer(cfg)
