"""Exploration and consistency switches wired through the RL trainer on a tiny model."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_trainer_rl import _cfg

import jaxrl_llm.losses as L
from jaxrl_llm.models import Decoder, ModelConfig, save_hf
from jaxrl_llm.rewards import register_reward
from jaxrl_llm.sampling import Sampler, SamplingParams, layer_entropies, routing_agreement, score
from jaxrl_llm.tokenizer import build_char_tokenizer
from jaxrl_llm.trainer.rl import RLTrainer
from jaxrl_llm.tracking import read_jsonl


@register_reward("digit_share_for_test")
def _digit_share(**_):
    # varies across the samples of a random model, so every group has a non-zero advantage
    return lambda prompts, completions, **cols: [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


VARIED = "reward.fns=[{name: digit_share_for_test}]"


def _run(cfg):
    """Train ``cfg``; returns the trainer, its metrics rows and its parameters before training (numpy)."""
    trainer = RLTrainer(cfg)
    before = jax.tree.map(np.asarray, trainer.learner.params)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer, read_jsonl(os.path.join(cfg.log.run_dir, "metrics.jsonl")), before


def test_exploration_and_correction_switches(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, None, "train.steps=2", "checkpoint.export_hf=false",
               "algorithm.cov_penalty=clip_cov", "algorithm.clip_cov_ratio=0.05", "algorithm.clip_cov_low=-10",
               "algorithm.clip_cov_high=10", "algorithm.entropy_target=100", "algorithm.entropy_coef=0.001",
               "algorithm.entropy_coef_step=0.002", "algorithm.rollout_is=token", "algorithm.rollout_mask=token",
               "algorithm.minibatches=2", VARIED)
    first, last = _run(cfg)[1]
    assert first["cov_selected"] >= 1 and np.isfinite(first["cov_mean"])
    # the entropy stays below the (unreachable) target, so the coefficient grows by one step per RL step
    assert first["entropy_coef"] == pytest.approx(0.001) and last["entropy_coef"] == pytest.approx(0.003)
    assert first["rc_weight_mean"] == pytest.approx(1.0, abs=1e-4) and first["rc_masked_frac"] == 0.0
    # the first minibatch is trained by the sampling policy itself; the second by a policy one update away
    assert first["offpolicy_kl/update0"] < 1e-6 < first["offpolicy_kl/update1"]


def test_kl_cov_high_entropy_tokens_smoothing_and_bupo_warmup(tiny_model_dir, tmp_path):
    # one run with these switches on; BuPO's warm-up trains only the layers up to bupo_layer (and the final norm
    # and head) in the first step
    switches = ["algorithm.cov_penalty=kl_cov", "algorithm.kl_cov_ratio=0.1", "algorithm.entropy_token_frac=0.2",
                "algorithm.ds_gamma_pos=0.01", "algorithm.ds_gamma_neg=0.01", "algorithm.rollout_is=sequence",
                "algorithm.rollout_mask=geometric", "log.layer_entropy=true", "algorithm.bupo_layer=0",
                "algorithm.bupo_steps=1"]
    trainer, rows, before = _run(_cfg(tiny_model_dir, tmp_path, None, "train.steps=1", "checkpoint.export_hf=false",
                                      *switches, VARIED))
    m = rows[-1]
    tokens = m["response_length_mean"] * 16  # 4 prompts x 4 samples
    assert m["pg_tokens"] == pytest.approx(0.2 * tokens, abs=2 + 0.01 * tokens)
    assert m["cov_selected"] == pytest.approx(0.1 * tokens, abs=2 + 0.01 * tokens)
    assert m["kl_cov_loss"] == pytest.approx(0.0, abs=1e-6)  # |logp - old_logp| = 0 before the first update
    assert {"layer_entropy/0", "layer_entropy/1"} <= set(m)

    after = jax.tree.map(np.asarray, trainer.learner.params)
    changed = lambda a, b: not np.array_equal(a, b)  # noqa: E731
    assert all(not changed(a, b) for a, b in zip(jax.tree.leaves(before["layers"][1]),
                                                 jax.tree.leaves(after["layers"][1])))
    assert any(changed(a, b) for a, b in zip(jax.tree.leaves(before["layers"][0]),
                                             jax.tree.leaves(after["layers"][0])))
    assert changed(before["norm"]["weight"], after["norm"]["weight"])
    assert changed(before["lm_head"], after["lm_head"])
    assert m["bupo_warmup"] == 1.0


def test_bupo_layer_must_exist(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, None, "algorithm.bupo_layer=5", "algorithm.bupo_steps=1")
    with pytest.raises(ValueError, match="bupo_layer=5"):
        RLTrainer(cfg)


def test_layer_entropies_match_a_hand_logit_lens():
    tok = build_char_tokenizer()
    cfg = ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=64)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(1, len(tok), (2, 5)), jnp.int32)
    pmask = jnp.asarray([[False, True, True, True, True], [True] * 5])
    tokens = jnp.asarray(rng.integers(1, len(tok), (2, 4)), jnp.int32)
    mask = jnp.asarray([[True, True, True, False], [True, True, False, False]])
    ents = np.asarray(layer_entropies(graphdef, state, prompt, pmask, tokens, mask, temperature=0.7))
    ids = jnp.concatenate([prompt, tokens], 1)
    full = jnp.concatenate([pmask, mask], 1)
    pos = jnp.maximum(jnp.cumsum(full, 1) - 1, 0)
    out = model(ids, pos, attention_mask=full, return_residuals=True)
    for layer in range(3):
        logits = model.logits(model.final_norm(out.residuals[layer + 1]))[:, 4:-1] / 0.7
        ent = L.entropy_from_logits(logits)
        expected = float(jnp.sum(jnp.where(mask, ent, 0.0)) / mask.sum())
        assert ents[layer] == pytest.approx(expected, rel=1e-5)
        # the scoring path with layer=l reads out the same policy
        _, ent_l = score(graphdef, state, prompt, pmask, tokens, mask, temperature=0.7, layer=layer)
        assert float(jnp.sum(ent_l) / mask.sum()) == pytest.approx(expected, rel=1e-5)


def test_routing_agreement_and_replay(tiny_moe_dir):
    from jaxrl_llm.models import load_hf

    model, _ = load_hf(tiny_moe_dir)
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 6)), jnp.int32)
    pmask = jnp.ones((2, 6), bool)
    ro = Sampler(model).generate(state, prompt, pmask, SamplingParams(max_new_tokens=8, n=2), jax.random.key(0))
    same = float(routing_agreement(graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, ro.experts))
    assert same == 1.0  # the sampler runs the trainer's code in fp32: identical routing
    other = (ro.experts + 1) % 4  # a different expert in every slot
    assert float(routing_agreement(graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                   other)) < 0.75
    # replaying the recorded routing reproduces the sampler's log-probs
    replayed, _ = score(graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, forced_experts=ro.experts)
    np.testing.assert_allclose(np.asarray(replayed), np.asarray(ro.logprobs), atol=1e-5)
    forced_other, _ = score(graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, forced_experts=other)
    assert np.abs(np.asarray(forced_other - ro.logprobs)).max() > 1e-3


def test_trainer_routing_replay_with_a_bf16_sampler(tiny_moe_dir, tmp_path):
    cfg = _cfg(tiny_moe_dir, tmp_path, None, "train.steps=1", "checkpoint.export_hf=false",
               "rollout.routing_replay=true", "rollout.sampler_dtype=bfloat16", VARIED)
    m = _run(cfg)[1][-1]
    assert 0.0 < m["routing_agreement"] <= 1.0 and np.isfinite(m["loss"])


def test_routing_replay_needs_moe(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="mixture-of-experts"):
        RLTrainer(_cfg(tiny_model_dir, tmp_path, None, "rollout.routing_replay=true"))
