"""Model parity with transformers' PyTorch implementation, checkpoint round trips, KV cache, sharding, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm.models import Decoder, ModelConfig, init_cache, left_pad_positions, load_hf, save_hf
from jaxrl_llm.parallel import make_mesh
from model_helpers import FAMILIES, hf_logits, padded_batch, random_hf_model, tiny_hf_config


def _logits(model, ids, mask):
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    out = model(ids, left_pad_positions(mask), attention_mask=mask)
    return np.asarray(model.logits(out.hidden))


@pytest.fixture(scope="module", params=FAMILIES)
def hf_checkpoint(request, tmp_path_factory):
    family = request.param
    hf = random_hf_model(family, seed=FAMILIES.index(family))
    path = str(tmp_path_factory.mktemp(family))
    hf.save_pretrained(path)
    return family, hf, path


def test_parity_with_transformers(hf_checkpoint):
    family, hf, path = hf_checkpoint
    model, cfg = load_hf(path)
    assert cfg.model_type == family
    ids, mask = padded_batch(cfg.vocab_size)
    diff = np.abs(_logits(model, ids, mask) - hf_logits(hf, ids, mask))[mask].max()
    print(f"{family}: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4


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
    out = model(ids_j[:, :prompt], pos[:, :prompt], attention_mask=mask_j[:, :prompt], cache=cache)
    steps = [np.asarray(model.logits(out.hidden))]
    cache = out.cache
    for t in range(prompt, ids.shape[1]):
        out = model(ids_j[:, t:t + 1], pos[:, t:t + 1], attention_mask=mask_j[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(np.asarray(model.logits(out.hidden)))
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
    run = jax.jit(lambda m, i, k: m.logits(m(i, left_pad_positions(k), attention_mask=k).hidden))
    np.testing.assert_allclose(np.asarray(run(sharded, jnp.asarray(ids), jnp.asarray(mask)))[mask],
                               _logits(model, ids, mask)[mask], atol=1e-5)


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
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 96, 5), rng.integers(1, 96, 4)
    packed = jnp.asarray(np.concatenate([a, b, [0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0]])
    pos = jnp.asarray([list(range(5)) + list(range(4)) + [0]])
    h = np.asarray(model(packed, pos, segment_ids=seg).hidden)[0]
    ha = np.asarray(model(jnp.asarray(a[None], jnp.int32), jnp.arange(5)[None]).hidden)[0]
    hb = np.asarray(model(jnp.asarray(b[None], jnp.int32), jnp.arange(4)[None]).hidden)[0]
    np.testing.assert_allclose(h[:5], ha, atol=1e-5)
    np.testing.assert_allclose(h[5:9], hb, atol=1e-5)


def test_moe_forced_routing_replay_and_outputs():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe"))
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    ids, mask = padded_batch(cfg.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    pos = left_pad_positions(mask)
    out = model(ids, pos, attention_mask=mask, return_residuals=True)
    assert out.experts.shape == (2, 3, ids.shape[1], 2) and out.router_logits.shape == (2, 3, ids.shape[1], 4)
    assert out.residuals.shape == (3, 3, ids.shape[1], 32)
    # the final hidden state is the final norm of the last residual
    np.testing.assert_allclose(np.asarray(model.final_norm(out.residuals[-1])), np.asarray(out.hidden), atol=1e-6)
    replay = model(ids, pos, attention_mask=mask, forced_experts=out.experts)
    np.testing.assert_array_equal(np.asarray(replay.hidden), np.asarray(out.hidden))
    # forcing other experts changes the output
    other = (out.experts + 1) % cfg.num_experts
    moved = model(ids, pos, attention_mask=mask, forced_experts=other)
    assert np.abs(np.asarray(moved.hidden) - np.asarray(out.hidden)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(moved.experts), np.asarray(other))


def test_remat_and_bf16_compute():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    base = Decoder(cfg, rngs=nnx.Rngs(0))
    remat = Decoder(cfg, rngs=nnx.Rngs(0), remat="full")
    ids, mask = padded_batch(cfg.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(m):
        return jnp.sum(m.logits(m(ids, left_pad_positions(mask), attention_mask=mask).hidden) ** 2)

    g1 = nnx.grad(loss)(base)
    g2 = nnx.grad(loss)(remat)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    bf = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = bf(ids, left_pad_positions(mask), attention_mask=mask)
    assert out.hidden.dtype == jnp.bfloat16 and bf.embed[...].dtype == jnp.bfloat16
    ref = base(ids, left_pad_positions(mask), attention_mask=mask).hidden
    assert np.abs(np.asarray(out.hidden, np.float32) - np.asarray(ref))[np.asarray(mask)].max() < 0.1
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
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' has shape"):
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
