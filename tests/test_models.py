"""Model parity with transformers' PyTorch implementation, checkpoint round trips, KV cache, sharding, errors."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm.models import Decoder, ModelConfig, init_cache, left_pad_positions, load_hf, save_hf
from jaxrl_llm.parallel import make_mesh
from model_helpers import FAMILIES, hf_logits, hf_outputs, padded_batch, random_hf_model, tiny_hf_config


# jitted forwards: compiled once per config and shape, much faster than op-by-op execution
@nnx.jit(static_argnames=("residuals",))
def _forward(model, ids, mask, residuals=False):
    out = model(ids, left_pad_positions(mask), attention_mask=mask, return_residuals=residuals)
    return model.logits(out.hidden), out


@nnx.jit
def _cached_forward(model, ids, pos, mask, cache):
    out = model(ids, pos, attention_mask=mask, cache=cache)
    return model.logits(out.hidden), out.cache


def _logits(model, ids, mask):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask))[0])


@pytest.fixture(scope="module", params=FAMILIES)
def hf_checkpoint(request, tmp_path_factory):
    family = request.param
    hf = random_hf_model(family, seed=FAMILIES.index(family))
    path = str(tmp_path_factory.mktemp(family))
    hf.save_pretrained(path)
    return family, hf, path


def _check_parity(name, hf, path):
    model, cfg = load_hf(path)
    ids, mask = padded_batch(cfg.vocab_size)
    ref = hf_outputs(hf, ids, mask)
    logits, out = _forward(model, jnp.asarray(ids), jnp.asarray(mask), residuals=True)
    diff = np.abs(np.asarray(logits) - ref.logits.numpy())[mask].max()
    print(f"{name}: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4
    # the residual stream: embeddings, then each layer's output (transformers' last entry is after the final norm)
    hs = [h.numpy() for h in ref.hidden_states]
    assert out.residuals.shape == (cfg.num_layers + 1,) + ids.shape + (cfg.hidden_size,)
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(out.residuals[i])[mask], hs[i][mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden)[mask], hs[-1][mask], atol=1e-5)
    if cfg.is_moe:
        # transformers returns router logits for the sparse layers only, as we do
        assert len(ref.router_logits) == cfg.num_moe_layers
        hf_router = np.stack([r.numpy().reshape(ids.shape + (-1,)) for r in ref.router_logits])
        np.testing.assert_allclose(np.asarray(out.router_logits)[:, mask], hf_router[:, mask], atol=1e-5)
        top = np.argsort(-hf_router, axis=-1)[..., :cfg.num_experts_per_tok]
        np.testing.assert_array_equal(np.sort(np.asarray(out.experts), -1)[:, mask], np.sort(top, -1)[:, mask])
    return model, cfg


def test_parity_with_transformers(hf_checkpoint):
    family, hf, path = hf_checkpoint
    _, cfg = _check_parity(family, hf, path)
    assert cfg.model_type == family


# variants: options the four base configs leave at their defaults
VARIANTS = {
    "llama_tied_attention_bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True)),
    "qwen3_bias": ("qwen3", dict(attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe_mixed_layers": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False,
                                                 num_experts=6, num_experts_per_tok=3)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_variants_and_round_trip(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    hf = random_hf_model(family, seed=7, **overrides)
    hf.save_pretrained(tmp_path / "src")
    model, cfg = _check_parity(variant, hf, str(tmp_path / "src"))
    save_hf(model, cfg, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids, mask = padded_batch(cfg.vocab_size, seed=3)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask)[mask], hf_logits(hf, ids, mask)[mask], atol=1e-6)
    assert ModelConfig.from_hf(reloaded.config) == cfg


def test_fused_expert_layout_loads(tmp_path):
    """transformers 5 keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F]); such a
    state dict written as is must load too."""
    from safetensors.torch import save_file

    hf = random_hf_model("qwen3_moe", seed=11)
    path = str(tmp_path / "legacy")
    hf.save_pretrained(path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(tmp_path / "config.json", "w") as f:
        f.write(open(os.path.join(path, "config.json")).read())
    fused, cfg = load_hf(str(tmp_path))
    legacy, _ = load_hf(path)
    ids, mask = padded_batch(cfg.vocab_size)
    np.testing.assert_array_equal(_logits(fused, ids, mask), _logits(legacy, ids, mask))
    np.testing.assert_allclose(_logits(fused, ids, mask)[mask], hf_logits(hf, ids, mask)[mask], atol=1e-4)
    # a missing fused tensor is reported under both of its names
    del state["model.layers.1.mlp.experts.down_proj"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.experts.0.down_proj.weight' \(nor its "
                                         r"fused form 'model.layers.1.mlp.experts.down_proj'\)"):
        load_hf(str(tmp_path))


def test_save_then_transformers_loads_same_logits(hf_checkpoint, tmp_path):
    family, hf, path = hf_checkpoint
    model, cfg = load_hf(path)
    save_hf(model, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids, mask = padded_batch(cfg.vocab_size, seed=3)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask)[mask], hf_logits(hf, ids, mask)[mask], atol=1e-6)
    # and jaxrl_llm reads its own output back identically
    again, _ = load_hf(str(tmp_path))
    np.testing.assert_array_equal(_logits(again, ids, mask), _logits(model, ids, mask))


def test_kv_cache_decode_matches_full_forward(hf_checkpoint):
    family, _, path = hf_checkpoint
    model, cfg = load_hf(path)
    ids, mask = padded_batch(cfg.vocab_size, lengths=(9, 5, 7), seed=1)
    full = _logits(model, ids, mask)
    prompt = 4  # prefill the first 4 columns, then one token at a time
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    pos = left_pad_positions(mask_j)
    cache = init_cache(cfg, ids.shape[0], ids.shape[1] + 2)
    logits, cache = _cached_forward(model, ids_j[:, :prompt], pos[:, :prompt], mask_j[:, :prompt], cache)
    steps = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):
        logits, cache = _cached_forward(model, ids_j[:, t:t + 1], pos[:, t:t + 1], mask_j[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, axis=1)
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_allclose(inc[mask], full[mask], atol=1e-5)


def test_sharded_load_matches_unsharded(hf_checkpoint):
    family, _, path = hf_checkpoint
    model, cfg = load_hf(path)
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2} if family == "qwen3_moe" else {"fsdp": 4, "tensor": 2})
    sharded, _ = load_hf(path, mesh=mesh)
    q = sharded.layers[0].attn.q[...]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec[:2] == ("fsdp", "tensor")
    # each device holds only its shard (q is split over fsdp x tensor, replicated over any other axis)
    assert q.addressable_shards[0].data.size == q.size // (mesh.shape["fsdp"] * mesh.shape["tensor"])
    ids, mask = padded_batch(cfg.vocab_size)
    np.testing.assert_allclose(_logits(sharded, ids, mask)[mask], _logits(model, ids, mask)[mask], atol=1e-5)


def test_transformers_reads_sharded_save_of_tied_model(tmp_path):
    hf = random_hf_model("qwen3", seed=5, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "src")
    model, cfg = load_hf(str(tmp_path / "src"))
    assert cfg.tie_word_embeddings
    save_hf(model, str(tmp_path / "out"), max_shard_size=20_000)
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = padded_batch(cfg.vocab_size)
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask)[mask], hf_logits(hf, ids, mask)[mask], atol=1e-6)
    again, _ = load_hf(str(tmp_path / "out"))
    np.testing.assert_array_equal(_logits(again, ids, mask), _logits(model, ids, mask))


def test_packed_segments_equal_separate_sequences():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3"))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda m, ids, pos, seg: m(ids, pos, segment_ids=seg).hidden)
    rng = np.random.default_rng(0)
    a, b, c = rng.integers(1, 96, 5), rng.integers(1, 96, 4), rng.integers(1, 96, 8)
    # row 0 packs two sequences and a pad; row 1 holds one sequence and two pads
    packed = jnp.asarray([np.concatenate([a, b, [0]]), np.concatenate([c, [0, 0]])], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0], [1] * 8 + [0, 0]])
    pos = jnp.asarray([list(range(5)) + list(range(4)) + [0], list(range(8)) + [0, 0]])
    h = np.asarray(fwd(model, packed, pos, seg))
    assert np.isfinite(h).all()
    # reference: each sequence alone (right-padded to a common length, which causal attention never sees)
    alone = np.zeros((3, 10), np.int32)
    for i, seq in enumerate((a, b, c)):
        alone[i, :len(seq)] = seq
    ref = np.asarray(nnx.jit(lambda m, ids: m(ids, jnp.broadcast_to(jnp.arange(10), (3, 10))).hidden)(
        model, jnp.asarray(alone)))
    np.testing.assert_allclose(h[0, :5], ref[0, :5], atol=1e-5)
    np.testing.assert_allclose(h[0, 5:9], ref[1, :4], atol=1e-5)
    np.testing.assert_allclose(h[1, :8], ref[2, :8], atol=1e-5)


def test_moe_forced_routing_replay_and_outputs():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe"))
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    ids, mask = padded_batch(cfg.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    pos = left_pad_positions(mask)
    fwd = nnx.jit(lambda m, forced: m(ids, pos, attention_mask=mask, return_residuals=True, forced_experts=forced))
    out = fwd(model, None)
    assert out.experts.shape == (2, 3, ids.shape[1], 2) and out.router_logits.shape == (2, 3, ids.shape[1], 4)
    assert out.residuals.shape == (3, 3, ids.shape[1], 32)
    # the chosen experts are the top-k of the router logits
    top = np.argsort(-np.asarray(out.router_logits), axis=-1)[..., :2]
    np.testing.assert_array_equal(np.sort(np.asarray(out.experts), -1), np.sort(top, -1))
    # the final hidden state is the final norm of the last residual
    np.testing.assert_allclose(np.asarray(model.final_norm(out.residuals[-1])), np.asarray(out.hidden), atol=1e-6)
    replay = fwd(model, out.experts)
    np.testing.assert_array_equal(np.asarray(replay.hidden), np.asarray(out.hidden))
    # forcing other experts changes the output
    other = (out.experts + 1) % cfg.num_experts
    moved = fwd(model, other)
    assert np.abs(np.asarray(moved.hidden) - np.asarray(out.hidden)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(moved.experts), np.asarray(other))
    with pytest.raises(ValueError, match="forced_experts must be"):
        model(ids, pos, attention_mask=mask, forced_experts=out.experts[:1])


def test_moe_layer_against_numpy():
    """One MoE block against a direct numpy evaluation of its definition (per token, top-k loop)."""
    from jaxrl_llm.models.layers import MoE

    for norm in (True, False):
        cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe", norm_topk_prob=norm))
        moe = MoE(cfg, rngs=nnx.Rngs(3))
        x = np.random.default_rng(0).normal(size=(2, 3, cfg.hidden_size)).astype(np.float32)
        out, logits, chosen = moe(jnp.asarray(x))
        w = {n: np.asarray(getattr(moe, n)[...]) for n in ("router", "gate", "up", "down")}
        silu = lambda z: z / (1 + np.exp(-z))
        for b in range(2):
            for t in range(3):
                z = x[b, t] @ w["router"]
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                top = np.argsort(-p)[:cfg.num_experts_per_tok]
                g = p[top] / p[top].sum() if norm else p[top]
                ref = sum(gi * (silu(x[b, t] @ w["gate"][e]) * (x[b, t] @ w["up"][e])) @ w["down"][e]
                          for gi, e in zip(g, top))
                np.testing.assert_allclose(np.asarray(out)[b, t], ref, rtol=1e-5, atol=1e-6)
                assert set(np.asarray(chosen)[b, t]) == set(top)


def test_swiglu_backward_equals_automatic_differentiation():
    """The MLP's hand-written backward pass: numerical gradients in float64, and the automatic gradient of the
    same formula in float32 (2-D and 3-D inputs, bf16 too)."""
    from jax.test_util import check_grads

    from jaxrl_llm.models.layers import swiglu

    def plain(x, gate, up, down):
        return (jax.nn.silu(x @ gate) * (x @ up)) @ down

    keys = jax.random.split(jax.random.key(0), 5)
    shapes = [(2, 3, 6), (6, 9), (6, 9), (9, 6)]
    with jax.enable_x64(True):
        args = [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, shapes)]
        check_grads(swiglu, args, order=1, modes=["rev"])
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
        for lead in ((2, 3), (5,)):
            args = [jax.random.normal(k, s, dtype) for k, s in zip(keys, [lead + (6,)] + shapes[1:])]
            dy = jax.random.normal(keys[4], lead + (6,), dtype)
            ours = jax.vjp(swiglu, *args)[1](dy)
            ref = jax.vjp(plain, *args)[1](dy)
            np.testing.assert_array_equal(np.asarray(swiglu(*args), np.float32), np.asarray(plain(*args), np.float32))
            for a, b in zip(ours, ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_rotary_sines_are_computed_once_per_forward_on_cpu():
    """XLA:CPU evaluates sin/cos element by element; the rotary tables are made once per forward (in a conditional
    no fusion crosses), so the compiled forward and backward hold as many sines and cosines for 4 layers as for 1
    (without the conditional, XLA puts them into every layer's rotating fusions)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the tables are made in a conditional on CPU only")

    def sines(layers):
        cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers,
                          num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=64)
        graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
        ids = jnp.ones((2, 16), jnp.int32)

        def loss(state):
            model = nnx.merge(graphdef, state)
            return jnp.sum(model.logits(model(ids, jnp.broadcast_to(jnp.arange(16), (2, 16))).hidden))

        return len(re.findall(r"\b(?:sine|cosine)\(", jax.jit(jax.grad(loss)).lower(state).compile().as_text()))

    assert sines(4) == sines(1) > 0


def test_projection_backward_equals_automatic_differentiation():
    """The attention projections' hand-written backward pass (``layers.project``): numerical gradients in float64,
    the automatic gradient of ``x @ w`` in float32 and bf16, 2-D and 3-D inputs."""
    from jax.test_util import check_grads

    from jaxrl_llm.models.layers import project

    keys = jax.random.split(jax.random.key(1), 3)
    with jax.enable_x64(True):
        args = [jax.random.normal(keys[0], (2, 3, 6), jnp.float64), jax.random.normal(keys[1], (6, 4), jnp.float64)]
        check_grads(project, args, order=1, modes=["rev"])
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
        for lead in ((2, 3), (5,)):
            x = jax.random.normal(keys[0], lead + (6,), dtype)
            w = jax.random.normal(keys[1], (6, 4), dtype)
            dy = jax.random.normal(keys[2], lead + (4,), dtype)
            ours = jax.vjp(project, x, w)[1](dy)
            ref = jax.vjp(lambda a, b: a @ b, x, w)[1](dy)
            for a, b in zip(ours, ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_remat_and_bf16_compute():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=1))
    ids, mask = padded_batch(cfg.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(m):
        return jnp.sum(m.logits(m(ids, left_pad_positions(mask), attention_mask=mask).hidden) ** 2)

    grads = {r: nnx.jit(nnx.grad(loss))(Decoder(cfg, rngs=nnx.Rngs(0), remat=r)) for r in ("none", "full", "dots")}
    for r in ("full", "dots"):
        for x, y in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[r])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    bf = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    _, out = _forward(bf, ids, mask)
    assert out.hidden.dtype == jnp.bfloat16 and bf.embed[...].dtype == jnp.bfloat16
    _, ref = _forward(Decoder(cfg, rngs=nnx.Rngs(0)), ids, mask)
    assert np.abs(np.asarray(out.hidden, np.float32) - np.asarray(ref.hidden))[np.asarray(mask)].max() < 0.1
    with pytest.raises(ValueError, match="model.remat"):
        Decoder(cfg, rngs=nnx.Rngs(0), remat="some")


# ---- bad input ------------------------------------------------------------------------------------------------

def test_unsupported_architectures_and_options():
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        ModelConfig.from_hf(transformers.GPT2Config())
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        ModelConfig.from_hf(tiny_hf_config("qwen3", rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                      "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf(tiny_hf_config("qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(tiny_hf_config("llama", hidden_act="gelu"))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    random_hf_model("qwen2", seed=2).save_pretrained(path)
    return path


def _copy_ckpt(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())


def test_missing_files_and_tensors(good_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    _copy_ckpt(good_checkpoint, tmp_path / "a")
    os.remove(tmp_path / "a" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(str(tmp_path / "a"))

    tensors = load_file(os.path.join(good_checkpoint, "model.safetensors"))
    _copy_ckpt(good_checkpoint, tmp_path / "b")
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    save_file(missing, tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        load_hf(str(tmp_path / "b"))

    wrong = dict(tensors)
    wrong["model.layers.0.mlp.up_proj.weight"] = np.zeros((10, 32), np.float32)
    save_file(wrong, tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' in .* has shape \(10, 32\), but the config implies \(64, 32\)"):
        load_hf(str(tmp_path / "b"))

    extra = dict(tensors)
    extra["model.layers.9.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(extra, tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="does not use.*layers.9"):
        load_hf(str(tmp_path / "b"))


def test_corrupt_safetensors(good_checkpoint, tmp_path):
    _copy_ckpt(good_checkpoint, tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(0)
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        load_hf(str(tmp_path))


def test_missing_shard_file_corrupt_index_and_integer_tensor(good_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, _ = load_hf(str(good_checkpoint))
    save_hf(model, str(tmp_path / "s"), max_shard_size="20KB")
    index = json.load(open(tmp_path / "s" / "model.safetensors.index.json"))
    name, file = next(iter(index["weight_map"].items()))
    os.remove(tmp_path / "s" / file)
    with pytest.raises(FileNotFoundError, match=f"tensor '.*' is mapped to .*{file}, which does not exist"):
        load_hf(str(tmp_path / "s"))
    with open(tmp_path / "s" / "model.safetensors.index.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupt safetensors index"):
        load_hf(str(tmp_path / "s"))

    _copy_ckpt(good_checkpoint, tmp_path / "i")
    tensors = load_file(os.path.join(good_checkpoint, "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, tmp_path / "i" / "model.safetensors")
    with pytest.raises(ValueError, match="'model.norm.weight' .* has dtype I32"):
        load_hf(str(tmp_path / "i"))


def test_tokenizer_and_generation_files_are_left_alone(good_checkpoint, tmp_path):
    _copy_ckpt(good_checkpoint, tmp_path)
    for name, text in (("tokenizer_config.json", '{"model_max_length": 64}'), ("tokenizer.json", "{}"),
                       ("generation_config.json", '{"do_sample": true}'), ("special_tokens_map.json", "{}")):
        (tmp_path / name).write_text(text)
    model, cfg = load_hf(str(tmp_path))
    ref, _ = load_hf(str(good_checkpoint))
    ids, mask = padded_batch(cfg.vocab_size)
    np.testing.assert_array_equal(_logits(model, ids, mask), _logits(ref, ids, mask))


def test_block_reads_equal_slices_of_the_full_tensor(tmp_path):
    """Each device reads only its block; that block must equal the same slice of the fully read parameter, for
    every layout (split heads, o_proj, biases, per-expert and fused experts)."""
    from hypothesis import given, settings, strategies as st
    from safetensors.torch import save_file

    from jaxrl_llm.models.hf_io import _block_reader, _Checkpoint, _resolve, weight_map

    hf = random_hf_model("qwen3_moe", seed=4, attention_bias=True)
    hf.save_pretrained(tmp_path / "per_expert")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = ModelConfig.from_hf(hf.config)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    shapes = {tuple(getattr(p, "key", p) for p in path): tuple(v.get_value().shape)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    readers = []
    for ckpt_dir in (tmp_path / "per_expert", tmp_path):
        ckpt = _Checkpoint(str(ckpt_dir))
        for key, src in weight_map(cfg).items():
            shape = shapes[key]
            read = _block_reader(ckpt, src, _resolve(ckpt, key, src), shape, np.dtype(np.float32))
            readers.append((key, shape, read, read(tuple(slice(None) for _ in shape))))
    fused_ckpt = _Checkpoint(str(tmp_path))
    assert all(_resolve(fused_ckpt, k, s) == s.fused for k, s in weight_map(cfg).items() if s.fused is not None)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.integers(0, len(readers) - 1), st.data())
    def check(i, data):
        key, shape, read, full = readers[i]
        index = []
        for n in shape:
            lo = data.draw(st.integers(0, n - 1))
            index.append(slice(lo, data.draw(st.integers(lo + 1, n))))
        np.testing.assert_array_equal(read(tuple(index)), full[tuple(index)], err_msg=str(key))

    check()
    # and the full reads are the loaded model's parameters
    (tmp_path / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    loaded, _ = load_hf(str(tmp_path))
    flat = {tuple(getattr(p, "key", p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
    for key, _, _, full in readers:
        np.testing.assert_array_equal(flat[key], full)


def test_rules_table_reshards(good_checkpoint):
    from jaxrl_llm.parallel import DEFAULT_RULES

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    a, _ = load_hf(str(good_checkpoint), mesh=mesh)
    rules = dict(DEFAULT_RULES, embed=None, heads="fsdp", kv_heads=None, mlp=("fsdp", "tensor"))
    b, _ = load_hf(str(good_checkpoint), mesh=mesh, rules=rules)
    P = jax.sharding.PartitionSpec
    assert a.layers[0].attn.q[...].sharding.spec == P("fsdp", "tensor", None)
    assert b.layers[0].attn.q[...].sharding.spec == P(None, "fsdp", None)
    assert b.layers[0].attn.k[...].sharding.spec == P(None, None, None)
    assert b.layers[0].mlp.up[...].sharding.spec == P(None, ("fsdp", "tensor"))
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bf16_save_and_reload(good_checkpoint, tmp_path):
    from safetensors import safe_open

    model, cfg = load_hf(str(good_checkpoint))
    save_hf(model, cfg, str(tmp_path), dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    again, _ = load_hf(str(tmp_path), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.bfloat16)), np.asarray(y))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert hf.dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip_and_family_layout(family):
    cfg = ModelConfig.from_hf(tiny_hf_config(family, eos_token_id=[3, 4]))
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.eos_token_id == (3, 4) and hash(cfg)
    assert cfg.qk_norm == family.startswith("qwen3") and cfg.qkv_bias == (family == "qwen2")
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=4)
    with pytest.raises(ValueError, match="qk_norm must be"):
        ModelConfig(model_type="qwen3", qk_norm=False, **base)
    with pytest.raises(ValueError, match="qwen2 has q/k/v biases"):
        ModelConfig(model_type="qwen2", qkv_bias=False, **base)
    with pytest.raises(ValueError, match="num_kv_heads must be positive"):
        ModelConfig(model_type="llama", **dict(base, num_kv_heads=0))
    moe = ModelConfig(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, **base)
    assert moe.moe_layers == (True, True)
