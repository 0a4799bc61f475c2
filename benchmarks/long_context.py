"""Long sequences: a small decoder's forward + backward with dense against blockwise attention, same run (CPU).

Model: a random Qwen3-style decoder (vocab 1024, hidden 256, 2 layers, 4 heads, 2 KV heads, head_dim 64, MLP 768,
float32), one row of T tokens, T = 1k, 2k, 4k, 8k; the gradient of the summed squared final hidden states with
respect to every parameter, jitted with the trainer's compile options.

Per (kernel, T), in a fresh subprocess each: XLA's compiled temporary bytes of that program
(``memory_analysis().temp_size_in_bytes``) and the process's peak resident memory after compiling and running it
once (``ru_maxrss``; it includes the Python/JAX baseline, printed too). Per T, in one subprocess, the median time of
a call, the two kernels taking turns. Ratios are dense / blockwise for memory and blockwise / dense for time.

Also one decode step (the sampler's ``decode_step``, 8 rows) against a KV cache of 8192 slots filled up to slot F
(F = 1024 and 8191): ``dense`` attends over every slot of the cache, the default kernel reads the key blocks up to
slot F only; time per step, the two taking turns, and their ratio.

    python benchmarks/long_context.py [--lengths 1024 2048 4096 8192] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

KINDS = ("dense", "blockwise")
STEPS = 20  # decode steps per timed call


def _parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-case", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--time-case", type=int, metavar="T", help=argparse.SUPPRESS)
    parser.add_argument("--decode-case", type=int, metavar="F", help=argparse.SUPPRESS)
    return parser.parse_args()


def _model(kind: str, t: int):
    from flax import nnx

    from jaxrl_llm.models import Decoder, ModelConfig

    cfg = ModelConfig(model_type="qwen3", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True, max_position_embeddings=t)
    return Decoder(cfg, rngs=nnx.Rngs(0), attention=kind)


def _program(kind: str, t: int):
    """``(jitted gradient function, its argument)`` for the model with attention ``kind`` at ``t`` tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl_llm.compile_options import compiler_options
    from jaxrl_llm.models import left_pad_positions

    graphdef, state = nnx.split(_model(kind, t))
    ids = jax.random.randint(jax.random.key(1), (1, t), 0, 1024)
    mask = jnp.ones((1, t), bool)

    def loss(state):
        out = nnx.merge(graphdef, state)(ids, left_pad_positions(mask), attention_mask=mask)
        return jnp.sum(out.hidden ** 2)
    return jax.jit(jax.grad(loss), compiler_options=compiler_options()), state


def memory_case(kind: str, t: int) -> dict:
    import resource

    import jax

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn, state = _program(kind, t)
    temp = fn.lower(state).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(fn(state))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"temp": temp, "rss": peak, "base": base}


def time_case(t: int, repeats: int) -> dict:
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import median_times

    programs = {kind: _program(kind, t) for kind in KINDS}
    calls = {kind: (lambda f=fn, s=state: jax.block_until_ready(f(s))) for kind, (fn, state) in programs.items()}
    return median_times(calls, repeats)


def decode_case(filled: int, repeats: int, slots: int = 8192, rows: int = 8) -> dict:
    """Seconds per decode step at slot ``filled - 1`` of a cache of ``slots``: full cache (dense) vs filled blocks."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import median_times

    from jaxrl_llm.compile_options import compiler_options
    from jaxrl_llm.models import init_cache
    from jaxrl_llm.sampling.sampler import decode_step

    calls = {}
    for kind in ("dense", "auto"):
        graphdef, state = nnx.split(_model(kind, slots))
        cache = init_cache(nnx.merge(graphdef, state).cfg, rows, slots)
        noise = functools.partial(jax.random.normal, shape=cache.k[0].shape)
        cache = cache.replace(index=jnp.asarray(filled - 1, jnp.int32), mask=cache.mask.at[:, :filled].set(True),
                              k=tuple(noise(jax.random.key(i)) for i in range(len(cache.k))),
                              v=tuple(noise(jax.random.key(i)).reshape(cache.v[0].shape) for i in range(len(cache.v))))
        tokens, positions = jnp.ones((rows,), jnp.int32), jnp.full((rows,), filled - 1, jnp.int32)

        # steps inside one program, the cache carried (updated in place, as in the sampler's loop), each step
        # writing slot `filled - 1` again
        @functools.partial(jax.jit, compiler_options=compiler_options())
        def steps(state, cache, graphdef=graphdef):
            def body(_, carry):
                total, cache = carry
                logits, cache, _ = decode_step(nnx.merge(graphdef, state), cache, tokens, positions)
                return total + logits[0, 0], cache.replace(index=cache.index - 1)
            return jax.lax.fori_loop(0, STEPS, body, (jnp.zeros(()), cache))[0]
        calls[kind] = functools.partial(lambda f, *a: jax.block_until_ready(f(*a)), steps, state, cache)
    return {kind: t / STEPS for kind, t in median_times(calls, repeats).items()}


def _child(*args) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import machine

    mib = 2 ** 20
    print(f"forward + backward, 1 row, Qwen3-style 2 layers x 4 heads (2 KV) x 64, float32; machine: {machine()}")
    print("| T | kernel | compiled temp MiB | peak RSS MiB | time s |")
    print("|---|---|---|---|---|")
    rows = {}
    for t in args.lengths:
        mem = {kind: _child("--memory-case", kind, t) for kind in KINDS}
        times = _child("--time-case", t, "--repeats", args.repeats)
        for kind in KINDS:
            print(f"| {t} | {kind} | {mem[kind]['temp'] / mib:.1f} | {mem[kind]['rss'] / mib:.0f} | "
                  f"{times[kind]:.3f} |", flush=True)
        rows[t] = (mem, times)
    print(f"(peak RSS of a process that only imported JAX and the model: "
          f"{rows[args.lengths[0]][0]['dense']['base'] / mib:.0f} MiB)")
    for t, (mem, times) in rows.items():
        above = {kind: mem[kind]["rss"] - mem[kind]["base"] for kind in KINDS}
        print(f"T={t}: dense/blockwise compiled temp {mem['dense']['temp'] / mem['blockwise']['temp']:.1f}x, "
              f"peak RSS {mem['dense']['rss'] / mem['blockwise']['rss']:.1f}x (above the idle process: "
              f"{above['dense'] / above['blockwise']:.1f}x); "
              f"blockwise/dense time {times['blockwise'] / times['dense']:.2f}x")
    print("decode step, 8 rows, KV cache of 8192 slots filled up to slot F:")
    for filled in (1024, 8191):
        t = _child("--decode-case", filled, "--repeats", max(args.repeats, 5))
        print(f"F={filled}: full cache (dense) {1e3 * t['dense']:.2f} ms, filled blocks (default) "
              f"{1e3 * t['auto']:.2f} ms, ratio {t['dense'] / t['auto']:.2f}x")
    last, first = max(rows), min(rows)
    print(f"goals: blockwise memory at {last} >= 8x lower than dense (compiled temp "
          f"{rows[last][0]['dense']['temp'] / rows[last][0]['blockwise']['temp']:.1f}x); blockwise time at {first} "
          f"<= 1.3x dense ({rows[first][1]['blockwise'] / rows[first][1]['dense']:.2f}x)")


if __name__ == "__main__":
    ARGS = _parse()
    if ARGS.memory_case:
        print(json.dumps(memory_case(ARGS.memory_case[0], int(ARGS.memory_case[1]))))
    elif ARGS.decode_case:
        print(json.dumps(decode_case(ARGS.decode_case, ARGS.repeats)))
    elif ARGS.time_case:
        print(json.dumps(time_case(ARGS.time_case, ARGS.repeats)))
    else:
        main(ARGS)
