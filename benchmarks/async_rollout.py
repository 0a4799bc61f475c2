"""RL step throughput: one-step-off-policy asynchronous rollouts and disaggregated sampling vs synchronous.

Same tiny Qwen3 (hidden 256, 4 layers, MLP 768, fp32, random weights), task and batch (8 prompts x 8 samples,
<= 32 prompt tokens, <= 64 new tokens) for every mode, on fake CPU devices (8 by default):

* sync: rollout, then update, on all devices;
* async: the next step's rollouts are sampled (from the weights before this step's update) while this step trains;
* disaggregated: the sampler on the last half of the devices, the trainer on the first half (weights resharded
  after every update), sync and async.

The first steps (compilation) are excluded; the median seconds per step of the remaining ones are reported with
their ratio to sync, measured in the same run. On a CPU the "devices" share the same cores, so the gain comes
from overlapping host work (tokenising, decoding, rewards, Python) and idle cores with device work, not from
extra hardware.

    python benchmarks/async_rollout.py [--steps 8] [--devices 8]
"""
from __future__ import annotations

import argparse
import os
import sys


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--devices", type=int, default=8)
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # fake devices must be requested before JAX starts
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_step import NEW, N, PROMPTS, build_model, time_jaxrl  # noqa: E402

WARMUP = 2
MODES = {
    "sync": [],
    "async": ["rollout.async_rollout=true", "algorithm.rollout_is=token"],
    "disaggregated": ["rollout.sampler_devices={half}"],
    "disaggregated + async": ["rollout.sampler_devices={half}", "rollout.async_rollout=true",
                              "algorithm.rollout_is=token"],
}


def seconds_per_step(model_dir: str, run_dir: str, steps: int, extra: list[str]) -> float:
    half = jax.device_count() // 2
    times = time_jaxrl(model_dir, run_dir, steps, tuple(e.format(half=half) for e in extra),
                       devices=jax.devices(), micro_batch=PROMPTS * N // half)
    return statistics.median(times[WARMUP:])


def main() -> int:
    args = ARGS or _parse()
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; {PROMPTS} prompts x {N} samples, "
          f"<= {NEW} new tokens; median of {args.steps - WARMUP} steps after {WARMUP} warm-up steps")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir)
        results = {}
        for name, extra in MODES.items():
            results[name] = seconds_per_step(model_dir, os.path.join(tmp, name.replace(" ", "")), args.steps, extra)
            print(f"  {name:<24} {results[name]:6.2f} s/step", flush=True)
    base = results["sync"]
    for name, sec in results.items():
        print(f"{name:<24} throughput vs sync: {base / sec:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
