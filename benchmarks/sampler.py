"""Generated tokens/s of the jitted sampler vs transformers' `generate`, same weights, same run (CPU).

Model: a tiny random Qwen3 (vocab 1024, hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, MLP 768, fp32).
Work: 32 prompts x 32 tokens -> 64 new tokens each (no stop token, so both generate exactly 64).
Also: the cost of a rollout in `exact` consistency mode relative to the default mode (exact mode's decode steps
visit the KV cache's key blocks in a loop of static length, the loop its update's decode pass runs; its old
log-probs are the sampler's own, so no scoring pass follows); and, on rollouts where rows stop
at different lengths (any of 32 stop tokens ends a row), the rollout with the decode batch compacted as rows
finish (the default) against one full-width loop.

The sampler runs twice: on one JAX device (XLA then spreads each kernel over the cores) and with the CPU split into
one device per core and the prompts sharded over them (`--xla_force_host_platform_device_count`, a `data` mesh
axis; the weights are replicated). A decode step's small matrix products gain nothing from XLA:CPU's second thread
(`[32, 256] x [256, 768]`: 113 us on one core, 128-137 us on two), so one device per core runs two half-batches
side by side instead.

    python benchmarks/sampler.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def per_core_devices(prompts: int) -> int:
    """One device per core the process may use, at most as many as divide the prompts evenly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(d for d in range(1, min(cores, prompts) + 1) if prompts % d == 0)


def _parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
# host devices must be requested before JAX starts
if ARGS is not None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={per_core_devices(ARGS.prompts)}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxrl_llm.models import load_hf  # noqa: E402
from jaxrl_llm.parallel import batch_sharding, make_mesh, shard_model  # noqa: E402
from jaxrl_llm.sampling import Sampler, SamplingParams, rollout_logprobs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import Peer, hf_generate_worker  # noqa: E402
from timing import machine, median_times  # noqa: E402


def main(args) -> None:

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1024, (args.prompts, args.prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    total_new = args.prompts * args.new_tokens

    # transformers runs in a process of its own (see peers.py); it makes the model and saves it for ours to load
    with tempfile.TemporaryDirectory() as tmp:
        hf = Peer(hf_generate_worker, tmp, ids, mask, args.new_tokens)
        torch_threads = hf.recv()
        model, _ = load_hf(tmp)
        per_core_model, _ = load_hf(tmp)
    try:
        run(args, hf, model, per_core_model, ids, mask, total_new, torch_threads)
    finally:
        hf.close()


def run(args, hf, model, per_core_model, ids, mask, total_new: int, torch_threads: int) -> None:
    graphdef, state = nnx.split(model)
    # the same sampler with the CPU split into one device per core: prompts sharded over them, weights replicated
    cores = jax.devices()[:per_core_devices(args.prompts)]
    mesh = make_mesh({"data": len(cores)}, cores)
    shard_model(per_core_model, mesh)
    per_core_state = nnx.split(per_core_model)[1]
    rows = batch_sharding(mesh)

    def run_hf():
        hf.call("generate")

    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    samplers = {mode: Sampler(model, consistency=mode) for mode in ("default", "exact")}

    def run_ours():
        ro = samplers["default"].generate(state, jids, jmask, params, next(keys))
        jax.block_until_ready(ro.tokens)
        assert int(ro.lengths.min()) == args.new_tokens

    per_core_sampler = Sampler(per_core_model)
    sharded_ids, sharded_mask = jax.device_put(jids, rows), jax.device_put(jmask, rows)

    def run_per_core():
        ro = per_core_sampler.generate(per_core_state, sharded_ids, sharded_mask, params, next(keys))
        jax.block_until_ready(ro.tokens)
        assert int(ro.lengths.min()) == args.new_tokens

    def rollout(mode):
        def run():
            jax.block_until_ready(samplers[mode].generate(state, jids, jmask, params, next(keys)).tokens)
        return run

    t = median_times({"hf": run_hf, "ours": run_ours, "per_core": run_per_core}, args.repeats)
    t_hf, t_ours, t_per_core = t["hf"], t["ours"], t["per_core"]
    t = median_times({"default": rollout("default"), "exact": rollout("exact")}, args.repeats)
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
          f"CPU (torch threads {torch_threads}; the sampler on one JAX device unless said otherwise)")
    print(f"machine: {machine()}")
    print(f"transformers generate : {total_new / t_hf:10.1f} tokens/s  ({t_hf:.3f} s)")
    print(f"jaxrl_llm sampler     : {total_new / t_ours:10.1f} tokens/s  ({t_ours:.3f} s)")
    print(f"speed-up vs transformers: {t_hf / t_ours:.2f}x (goal >= 3x)")
    print(f"jaxrl_llm sampler, {len(cores)} device(s), one per core: {total_new / t_per_core:10.1f} tokens/s  "
          f"({t_per_core:.3f} s), speed-up vs transformers {t_hf / t_per_core:.2f}x")
    print(f"rollout, default mode: {t_default:.3f} s; exact mode: {t_exact:.3f} s; "
          f"exact/default cost ratio: {t_exact / t_default:.2f}x (goal <= 1.3x)")
    print(f"sampler vs scorer max |logp diff|: default {figures['default']:.3g}, exact (replay) {figures['exact']:.3g}")
    lengths = np.concatenate(lengths)
    print(f"rollouts with stops (mean length {lengths.mean():.1f}, {np.mean(lengths == args.new_tokens):.0%} "
          f"at the limit): compacted {t_compact:.3f} s, one full-width loop {t_full:.3f} s, "
          f"speed-up {t_full / t_compact:.2f}x")


if __name__ == "__main__":
    main(ARGS)
