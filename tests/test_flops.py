"""Model FLOPs of an RL step against a hand count, and the per-token and attention terms against XLA's count."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxrl_llm.config import load_config
from jaxrl_llm.models import Decoder, ModelConfig, left_pad_positions
from jaxrl_llm.trainer.flops import (StepPasses, attention_flops_per_pair, forward_flops, rl_step_flops, step_passes,
                                     weight_flops_per_token)

# L=2, d=8, h=2, kv=1, hd=4, f=16, V=10, untied
TINY = ModelConfig(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=4, qk_norm=True)
PROMPTS = [3, 5]
RESPONSES = [[2, 1], [4, 0]]


def test_hand_count():
    # per layer: q 8*2*4 = 64, k 8*4 = 32, v 32, o 64, MLP 3*8*16 = 384 -> 576; 2 layers 1152; unembedding 80
    assert weight_flops_per_token(TINY) == 2 * 1232
    assert weight_flops_per_token(TINY, unembed=False) == 2 * 1152
    assert attention_flops_per_pair(TINY) == 4 * 2 * 2 * 4
    # shared prompts: tokens 3 + 5 + 7 = 15; pairs: prompt 1: 3*4/2 = 6, its responses 2*3 + 3 = 9 and 1*3 + 1 = 4;
    # prompt 2: 5*6/2 = 15, its responses 4*5 + 10 = 30 and 0 -> 64 pairs
    assert forward_flops(TINY, PROMPTS, RESPONSES, shared=True) == 2464 * 15 + 64 * 64
    # each response with its own copy of the prompt: tokens 2*3 + 2*5 + 7 = 23, pairs 2*6 + 2*15 + 43 = 85
    assert forward_flops(TINY, PROMPTS, RESPONSES, shared=False) == 2464 * 23 + 64 * 85
    moe = ModelConfig(model_type="qwen3_moe", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=6)
    # attention 192 + router 8*4 + 2 active experts of 3*8*6 + unembedding 80
    assert weight_flops_per_token(moe) == 2 * (192 + 32 + 288 + 80)


def _cfg(*extra):
    return load_config(None, ["model.path=unused", "rollout.n=2", "train.prompts_per_step=2",
                              "train.micro_batch_size=4", *extra])


def test_step_passes_and_totals():
    shared, unshared = 2464 * 15 + 64 * 64, 2464 * 23 + 64 * 85
    # GRPO, old log-probs from the update: sampling + 3 forwards of the update, no scoring pass
    passes = step_passes(_cfg(), old_logp_pass=False, bupo_warmup=False, score_group=2, update_group=2)
    assert passes == StepPasses(scoring=0, scoring_shared=True, update_epochs=1, update_shared=True)
    out = rl_step_flops(TINY, PROMPTS, RESPONSES, passes)
    assert (out["sample"], out["score"], out["update"], out["total"]) == (shared, 0, 3 * shared, 4 * shared)
    # a scoring pass and a reference pass when they are needed; prompts not shared in the update
    passes = step_passes(_cfg("algorithm.kl_coef=0.1"), old_logp_pass=True, bupo_warmup=False,
                         score_group=2, update_group=1)
    out = rl_step_flops(TINY, PROMPTS, RESPONSES, passes)
    assert out["score"] == 2 * shared and out["update"] == 3 * unshared
    assert out["total"] == shared + 2 * shared + 3 * unshared
    # PPO: a separate critic without the unembedding, its values forward and 2 epochs of updates, per response
    ppo = _cfg("algorithm.advantage=gae", "algorithm.critic=separate", "algorithm.ppo_epochs=2")
    passes = step_passes(ppo, old_logp_pass=True, bupo_warmup=False, score_group=1, update_group=1)
    out = rl_step_flops(TINY, PROMPTS, RESPONSES, passes)
    assert out["critic"] == (1 + 3 * 2) * (2304 * 23 + 64 * 85) and out["update"] == 6 * unshared
    # exact consistency: each of 2 epochs x 2 minibatches decodes the whole batch (prompts shared) before its
    # forward and backward; none during a BuPO warm-up, which trains a layer's read-out
    exact = _cfg("rollout.consistency=exact", "algorithm.ppo_epochs=2", "algorithm.minibatches=2")
    passes = step_passes(exact, old_logp_pass=False, bupo_warmup=False, score_group=2, update_group=1)
    out = rl_step_flops(TINY, PROMPTS, RESPONSES, passes)
    assert passes.update_decodes == 4 and out["update"] == 6 * unshared + 4 * shared
    assert step_passes(exact, old_logp_pass=False, bupo_warmup=True, score_group=2, update_group=1).update_decodes == 0
    with pytest.raises(ValueError, match="response_lengths must be"):
        forward_flops(TINY, [3], [2, 1], shared=True)


@pytest.mark.parametrize("length", [64, 256])
def test_terms_match_what_xla_counts_for_a_full_attention_forward(length):
    """XLA computes the full T x T attention (masked), so its count is ours with T^2 pairs, plus elementwise work."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True, max_position_embeddings=1024)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

    def logits(state, ids, mask):
        model = nnx.merge(graphdef, state)
        return model.logits(model(ids, left_pad_positions(mask), attention_mask=mask).hidden)

    ids, mask = jnp.ones((1, length), jnp.int32), jnp.ones((1, length), bool)
    cost = jax.jit(logits).lower(state, ids, mask).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    full = weight_flops_per_token(cfg) * length + attention_flops_per_pair(cfg) * length ** 2
    assert abs(xla / full - 1) < 0.05, (xla, full)
    causal = forward_flops(cfg, [length], [[0]], shared=True)
    assert causal == weight_flops_per_token(cfg) * length + attention_flops_per_pair(cfg) * length * (length + 1) / 2


def test_throughput_metric_counts_the_step_passes():
    """The trainer's throughput metrics take their FLOPs from rl_step_flops: the rows of a rollout (each prompt
    repeated n times, left-padded; responses right-padded) give the same lengths as PROMPTS and RESPONSES."""
    import numpy as np

    from jaxrl_llm.sampling import Rollout
    from jaxrl_llm.trainer.metrics import throughput

    prompt_mask = np.array([[0, 0, 1, 1, 1]] * 2 + [[1, 1, 1, 1, 1]] * 2, bool)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    ro = Rollout(prompt_ids=jnp.zeros((4, 5), jnp.int32), prompt_mask=jnp.asarray(prompt_mask),
                 tokens=jnp.zeros((4, 4), jnp.int32), logprobs=jnp.zeros((4, 4)), mask=jnp.asarray(mask),
                 lengths=jnp.asarray(mask.sum(1), jnp.int32), finish_reason=jnp.zeros(4, jnp.int32), n=2)
    passes = StepPasses(scoring=1, scoring_shared=True, update_epochs=2, update_shared=False)
    out = throughput(ro, 2.0, TINY, passes, 2, peak_tflops=1e-6, devices=4)
    # sampling and one scoring pass with shared prompts, 2 epochs of updates (3 forwards each) without
    shared, unshared = 2464 * 15 + 64 * 64, 2464 * 23 + 64 * 85
    assert out["model_tflops_per_sec"] == pytest.approx((2 * shared + 6 * unshared) / 2.0 / 1e12, rel=1e-12)
    assert out["tokens_per_sec"] == (2 * 3 + 2 * 5 + 7) / 2.0
    assert out["mfu"] == pytest.approx(out["model_tflops_per_sec"] / (1e-6 * 4), rel=1e-12)
    assert "mfu" not in throughput(ro, 2.0, TINY, passes, 2, peak_tflops=None, devices=4)
