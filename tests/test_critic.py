"""PPO's critic: value positions, token-level rewards, and a value update that fits returns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_llm.models import Decoder, ModelConfig, left_pad_positions
from jaxrl_llm.trainer.critic import init_value_head, make_critic_step, token_level_rewards, token_values


def _model():
    cfg = ModelConfig(model_type="qwen3", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True, max_position_embeddings=64)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def _batch():
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(2, 40, (4, 5)).astype(np.int32)
    prompt_mask = np.ones((4, 5), bool)
    prompt_mask[0, :2] = False  # left padding
    tokens = rng.integers(2, 40, (4, 6)).astype(np.int32)
    mask = np.arange(6)[None] < np.array([6, 3, 1, 4])[:, None]
    return prompt_ids, prompt_mask, tokens, mask


def test_token_level_rewards_hand_case():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    out = token_level_rewards(np.array([2.0, -1.0, 5.0]), mask, token_penalty=np.full((3, 4), -0.1))
    np.testing.assert_allclose(out, [[-0.1, -0.1, 1.9, 0.0], [-1.1, 0, 0, 0], [0, 0, 0, 0]], atol=1e-6)


def test_values_read_the_hidden_state_before_each_token():
    model = _model()
    head = {"w": jnp.asarray(np.random.default_rng(1).normal(size=16), jnp.float32), "b": jnp.asarray(0.5)}
    prompt_ids, prompt_mask, tokens, mask = _batch()
    values = np.asarray(token_values(model, head, prompt_ids, prompt_mask, tokens, mask))
    # independent path: the full forward, position P - 1 + t for response token t
    ids = np.concatenate([prompt_ids, tokens], 1)
    full = np.concatenate([prompt_mask, mask], 1)
    hidden = np.asarray(model(jnp.asarray(ids), left_pad_positions(jnp.asarray(full)),
                              attention_mask=jnp.asarray(full)).hidden)
    for i in range(4):
        for t in range(6):
            want = hidden[i, 4 + t] @ np.asarray(head["w"]) + 0.5 if mask[i, t] else 0.0
            np.testing.assert_allclose(values[i, t], want, rtol=1e-5, atol=1e-5)
    assert init_value_head(16)["w"].shape == (16,)


def test_critic_update_fits_returns_and_is_split_invariant():
    model = _model()
    graphdef, trunk, rest = nnx.split(model, nnx.Param, ...)
    params = {"trunk": trunk, "head": init_value_head(16)}
    prompt_ids, prompt_mask, tokens, mask = _batch()
    returns = np.where(mask, np.linspace(-1, 1, 24).reshape(4, 6), 0.0).astype(np.float32)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask,
             "old_values": np.zeros((4, 6), np.float32), "returns": returns}
    opt = optax.adam(1e-2)
    step = jax.jit(make_critic_step(graphdef, opt, value_clip=None))

    def split(k):
        return {key: jnp.asarray(v).reshape((k, -1) + v.shape[1:]) for key, v in batch.items()}

    p1, _, m1 = step(params, rest, opt.init(params), split(1))
    p2, _, m2 = step(params, rest, opt.init(params), split(2))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(m1["value_loss"], m2["value_loss"], rtol=1e-6)
    # the initial loss is 0.5 * mean(returns^2) over valid tokens (zero head)
    np.testing.assert_allclose(m1["value_loss"], 0.5 * np.mean(returns[mask] ** 2), rtol=1e-5)

    state = opt.init(params)
    for _ in range(150):
        params, state, m = step(params, rest, state, split(2))
    assert float(m["value_loss"]) < 0.1 * float(m1["value_loss"])
