"""Where a rollout's time goes: the sampler benchmark's rollout under the JAX profiler, summed by XLA kernel.

Model and work as in `benchmarks/sampler.py` (tiny random Qwen3, fp32, 32 prompts x 32 tokens -> 64 new tokens).
Prints the wall time per rollout, the summed time of the compiled kernels (both CPU threads; when it is close to
the wall time the kernels run one after another), the kernels launched per decode step, and the time per kind of
kernel (``dot``, the fusion kinds XLA names after their ops) and per kernel with its output shape. A diagnostic
for work on the decode loop, not a benchmark: profiling slows the run a little.

    python benchmarks/decode_profile.py [--rollouts 3] [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.models import Decoder, ModelConfig
from jaxrl_llm.sampling import Sampler, SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402


def kernel_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """Summed nanoseconds and launch counts of each XLA kernel on the CPU client's worker threads."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    total, count = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # the threads that run the compiled kernels
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "while")):  # containers of the kernels below
                    continue
                total[ev.name] += ev.duration_ns
                count[ev.name] += 1
    return total, count


def output_shapes(hlo_text: str) -> dict[str, str]:
    """Kernel name -> the shape of its result, from the compiled program's text."""
    shapes = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ", hlo_text, re.M):
        shapes.setdefault(m.group(1), m.group(2)[:60])
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    prompts, prompt_len, new = 32, 32, 64

    cfg = ModelConfig(model_type="qwen3", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 1024, (prompts, prompt_len)), jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    sampler = Sampler(model)
    params = SamplingParams(temperature=1.0, max_new_tokens=new)

    def rollout(i):
        return jax.block_until_ready(sampler.generate(state, ids, mask, params, jax.random.key(i)).tokens)

    for i in range(2):  # compile and warm up
        rollout(i)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for i in range(args.rollouts):
            rollout(i)
        wall = (time.perf_counter() - start) / args.rollouts
        jax.profiler.stop_trace()
        total, count = kernel_times(trace_dir)
    # the program the sampler ran, to name each kernel's result shape
    shapes = output_shapes(sampler.lower(state, ids, mask, params, jax.random.key(0)).compile().as_text())

    per = 1e6 * args.rollouts  # ns -> ms per rollout
    launches = sum(count.values()) / args.rollouts
    print(f"rollout: {prompts} prompts x {prompt_len} tokens -> {new} new tokens, tiny Qwen3 fp32 ({machine()})")
    print(f"wall {wall * 1e3:.1f} ms per rollout; kernels {sum(total.values()) / per:.1f} ms summed over threads; "
          f"{launches:.0f} kernel launches ({launches / new:.0f} per decode step)")
    kinds = collections.Counter()
    for name, ns in total.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ns
    print("\nby kind (ms per rollout):")
    for kind, ns in kinds.most_common(args.top):
        print(f"  {ns / per:8.2f}  {kind}")
    print("\nby kernel (ms per rollout, launches per rollout, us per launch, result shape):")
    for name, ns in total.most_common(args.top):
        n = count[name] / args.rollouts
        print(f"  {ns / per:8.2f} {n:6.0f}x {ns / count[name] / 1e3:8.1f} us  {name:40s} {shapes.get(name, '')}")


if __name__ == "__main__":
    main()
