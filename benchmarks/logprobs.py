"""Naive full-logits log-softmax vs the chunked `token_logprobs_and_entropy`, forward + backward.

Shapes (default): vocab 151,936, 4,096 tokens (2 x 2,048), hidden 1,024, fp32, CPU. Each variant runs in its own
subprocess so its peak resident memory is its own. Reported per variant:

* XLA's compiled memory analysis of the jitted value-and-grad: temporaries (working memory) and
  temporaries + outputs + arguments (everything the step holds);
* the process's peak RSS increase over the baseline after the inputs were created;
* median wall time of the jitted step over several repeats after warm-up.

Goal: >= 8x lower peak memory at <= 1.2x the time of the naive path.

    python benchmarks/logprobs.py [--tokens 4096] [--vocab 151936] [--hidden 1024] [--chunk 256]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.losses import entropy_from_logits, token_logprobs_and_entropy

    batch = 2
    t = tokens // batch
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (batch, t, hidden), jnp.float32)
    w = jax.random.normal(k[1], (hidden, vocab), jnp.float32) * 0.02
    tok = jax.random.randint(k[2], (batch, t), 0, vocab)
    coef = jax.random.normal(k[3], (batch, t), jnp.float32)
    jax.block_until_ready((h, w, tok, coef))
    base = _peak_rss_bytes()

    if variant == "naive":
        def logp_ent(h, w):
            z = jnp.einsum("btd,dv->btv", h, w)
            logp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tok[..., None], axis=-1)[..., 0]
            return logp, entropy_from_logits(z)
    else:
        def logp_ent(h, w):
            return token_logprobs_and_entropy(h, w, tok, chunk=chunk)

    def objective(h, w):
        logp, ent = logp_ent(h, w)
        return jnp.sum(coef * logp) + 0.01 * jnp.sum(ent)

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    compiled = step.lower(h, w).compile()
    mem = compiled.memory_analysis()
    out = compiled(h, w)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(h, w))
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "total_bytes": int(mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes),
        "rss_increase_bytes": _peak_rss_bytes() - base,
        "seconds": statistics.median(times),
        "value": float(out[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.hidden, args.chunk, args.repeats)))
        return

    results = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--repeats",
               str(args.repeats)]
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    gib = 1024**3
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk} fp32 "
          f"(forward + backward, jitted)")
    print(f"{'variant':<9}{'XLA temp GiB':>14}{'XLA total GiB':>15}{'peak RSS +GiB':>15}{'seconds':>10}")
    for name, r in results.items():
        print(f"{name:<9}{r['temp_bytes'] / gib:>14.3f}{r['total_bytes'] / gib:>15.3f}"
              f"{r['rss_increase_bytes'] / gib:>15.3f}{r['seconds']:>10.3f}")
    n, c = results["naive"], results["chunked"]
    mem_ratio = n["total_bytes"] / c["total_bytes"]
    temp_ratio = n["temp_bytes"] / max(c["temp_bytes"], 1)
    rss_ratio = n["rss_increase_bytes"] / max(c["rss_increase_bytes"], 1)
    time_ratio = c["seconds"] / n["seconds"]
    print(f"memory ratio naive/chunked: XLA total {mem_ratio:.1f}x, XLA temp {temp_ratio:.1f}x, "
          f"peak RSS {rss_ratio:.1f}x")
    print(f"time ratio chunked/naive: {time_ratio:.2f}x")
    print(f"objective values agree: naive {n['value']:.6g} chunked {c['value']:.6g}")
    ok = temp_ratio >= 8 and time_ratio <= 1.2
    print(f"goal (>= 8x lower working memory at <= 1.2x time): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
