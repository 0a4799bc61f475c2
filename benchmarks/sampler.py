"""Generated tokens/s of the jitted sampler vs transformers' `generate`, same weights, same run (CPU).

Model: a tiny random Qwen3 (vocab 1024, hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, MLP 768, fp32).
Work: 32 prompts x 32 tokens -> 64 new tokens each (no stop token, so both generate exactly 64).
Also: the cost of a rollout plus the trainer-side scoring of its tokens in `exact` consistency mode relative to
the default mode (the extra cost exact mode pays for bitwise-equal log-probs); and, on rollouts where rows stop
at different lengths (any of 32 stop tokens ends a row), the rollout with the decode batch compacted as rows
finish (the default) against one full-width loop.

    python benchmarks/sampler.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from jaxrl_llm.models import load_hf
from jaxrl_llm.sampling import Sampler, SamplingParams, rollout_logprobs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, median_times  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    cfg = transformers.Qwen3Config(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, intermediate_size=768,
                                   max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1024, (args.prompts, args.prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    total_new = args.prompts * args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = load_hf(tmp)
    graphdef, state = nnx.split(model)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new_tokens

    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    samplers = {mode: Sampler(model, consistency=mode) for mode in ("default", "exact")}

    def run_ours():
        ro = samplers["default"].generate(state, jids, jmask, params, next(keys))
        jax.block_until_ready(ro.tokens)
        assert int(ro.lengths.min()) == args.new_tokens

    def rollout_and_score(mode):
        def run():
            ro = samplers[mode].generate(state, jids, jmask, params, next(keys))
            jax.block_until_ready(rollout_logprobs(samplers[mode], graphdef, state, ro, temperature=1.0))
        return run

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t = median_times({"hf": run_hf, "ours": run_ours}, args.repeats)
    t_hf, t_ours = t["hf"], t["ours"]
    t = median_times({"default": rollout_and_score("default"), "exact": rollout_and_score("exact")}, args.repeats)
    t_default, t_exact = t["default"], t["exact"]

    stopping = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_tokens=tuple(range(1, 33)))
    lengths = []

    def rollout_with_stops(sampler):
        def run():
            ro = sampler.generate(state, jids, jmask, stopping, next(keys))
            lengths.append(np.asarray(ro.lengths))
        return run

    t = median_times({"compact": rollout_with_stops(samplers["default"]),
                      "full": rollout_with_stops(Sampler(model, compact_rows=0))}, args.repeats)
    t_compact, t_full = t["compact"], t["full"]

    # mismatch figures in each mode on one rollout
    figures = {}
    for mode, sampler in samplers.items():
        ro = sampler.generate(state, jids, jmask, params, jax.random.key(1))
        logp, _ = rollout_logprobs(sampler, graphdef, state, ro, temperature=1.0)
        figures[mode] = float(jnp.max(jnp.abs(logp - ro.logprobs) * ro.mask))

    print(f"{args.prompts} prompts x {args.prompt_len} tokens -> {args.new_tokens} new tokens, tiny Qwen3 fp32, "
          f"CPU ({jax.device_count()} JAX device(s), torch threads {torch.get_num_threads()})")
    print(f"machine: {machine()}")
    print(f"transformers generate : {total_new / t_hf:10.1f} tokens/s  ({t_hf:.3f} s)")
    print(f"jaxrl_llm sampler     : {total_new / t_ours:10.1f} tokens/s  ({t_ours:.3f} s)")
    print(f"speed-up vs transformers: {t_hf / t_ours:.2f}x (goal >= 3x)")
    print(f"rollout + scoring, default mode: {t_default:.3f} s; exact mode: {t_exact:.3f} s; "
          f"exact/default cost ratio: {t_exact / t_default:.2f}x (goal <= 1.3x)")
    print(f"sampler vs trainer max |logp diff|: default {figures['default']:.3g}, exact {figures['exact']:.3g}")
    lengths = np.concatenate(lengths)
    print(f"rollouts with stops (mean length {lengths.mean():.1f}, {np.mean(lengths == args.new_tokens):.0%} "
          f"at the limit): compacted {t_compact:.3f} s, one full-width loop {t_full:.3f} s, "
          f"speed-up {t_full / t_compact:.2f}x")


if __name__ == "__main__":
    main()
