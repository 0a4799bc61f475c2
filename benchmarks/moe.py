"""Routed mixture of experts vs evaluating every expert: XLA FLOPs and CPU time, measured in one run.

Models: Qwen3-MoE decoders of 2 layers (hidden 256, 4 heads of 64, experts of width 128), with 64 experts top-8
(the routing of Qwen3-30B-A3B, half its experts) and with 8 experts top-8 (every expert chosen: the same
active parameters, no routing to exploit). Batch: 4 rows x 256 tokens.

  (a) XLA's cost analysis (FLOPs) of the forward, 64 experts over 8 experts, for the routed layer (every tile of
      its static bound counted: ``moe.static_tile_loops``) and for dense evaluation of every expert; and what it
      counts for ``jax.lax.ragged_dot`` on this backend, against the product's useful FLOPs;
  (b) CPU time of forward + backward of the 64-expert model, dense over routed, the two taking turns;
  (c) CPU time of one decode step (one token per row, KV cache of 80 slots) of the 64-expert model, 64 rows;
  (d) (b) and (c) for a tiny model like the tests' (4 experts top-2, hidden 32, experts of width 24).

    python benchmarks/moe.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, median_times  # noqa: E402

from jaxrl_llm.models import Decoder, ModelConfig, init_cache, layers, moe  # noqa: E402
from jaxrl_llm.sampling.sampler import decode_step  # noqa: E402


def config(experts: int, k: int, hidden: int = 256, heads: int = 4, head_dim: int = 64, width: int = 128):
    return ModelConfig(model_type="qwen3_moe", vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_layers=2, num_heads=heads, num_kv_heads=max(heads // 2, 1), head_dim=head_dim,
                       qk_norm=True, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=width,
                       moe_layers=(True, True), norm_topk_prob=True, max_position_embeddings=1024)


TINY = dict(hidden=32, heads=4, head_dim=8, width=24)


def _dense_forward(x, router, gate, up, down, *, k, norm_topk_prob, forced_experts=None):
    logits, top_p, top_i = moe.route(x, router, k, norm_topk_prob, forced_experts)
    return moe._dense_experts(x, top_p, top_i, gate, up, down), logits, top_i


@contextlib.contextmanager
def evaluation(kind: str):
    """Trace the MoE layers as ``routed`` (the model's own), ``routed-static`` (every tile of the static bound,
    for the cost analysis) or ``dense`` (every expert for every token)."""
    if kind == "dense":
        with mock.patch.object(layers, "moe_forward", _dense_forward):
            yield
    elif kind == "routed-static":
        with moe.static_tile_loops():
            yield
    else:
        yield


def batch(cfg, rows: int, time: int):
    tokens = jax.random.randint(jax.random.key(1), (rows, time), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(time), (rows, time))
    return tokens, positions


def _forward(graphdef, state, tokens, positions):
    return nnx.merge(graphdef, state)(tokens, positions).hidden


def _loss(params, graphdef, rest, tokens, positions):
    hidden = nnx.merge(graphdef, params, rest)(tokens, positions).hidden
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))


def forward_flops(cfg, kind: str, rows: int, time: int) -> float:
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    with evaluation(kind):
        # a new function each time: jit reuses the trace of a function it has seen with the same arguments
        compiled = jax.jit(lambda *a: _forward(*a), static_argnums=0).lower(graphdef, state, *batch(cfg, rows, time)).compile()
    return compiled.cost_analysis()["flops"]


def ragged_dot_flops(rows: int, d: int, f: int, groups: int) -> tuple[float, float]:
    """XLA's FLOPs for ``jax.lax.ragged_dot`` of ``[rows, d]`` in ``groups`` even groups by ``[groups, d, f]``, and
    the useful ``2 rows d f``."""
    lhs, rhs = jnp.ones((rows, d)), jnp.ones((groups, d, f))
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    compiled = jax.jit(jax.lax.ragged_dot).lower(lhs, rhs, sizes).compile()
    return compiled.cost_analysis()["flops"], 2.0 * rows * d * f


def train_step(cfg, kind: str, rows: int, time: int):
    """A compiled forward + backward (gradients of every parameter) and a call running it."""
    graphdef, params, rest = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    args = (params, graphdef, rest, *batch(cfg, rows, time))
    with evaluation(kind):
        compiled = jax.jit(lambda *a: jax.value_and_grad(_loss)(*a), static_argnums=1).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(args[0], *args[2:]))


def _decode(graphdef, state, cache, tokens, positions):
    return decode_step(nnx.merge(graphdef, state), cache, tokens, positions)


def decode(cfg, kind: str, rows: int, prompt: int = 16, slots: int = 80):
    """A compiled decode step after a ``prompt``-token prefill, and a call running it."""
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens, positions = batch(cfg, rows, prompt)
    cache = model(tokens, positions, cache=init_cache(cfg, rows, slots)).cache
    graphdef, state = nnx.split(model)
    args = (graphdef, state, cache, tokens[:, -1], jnp.full((rows,), prompt, jnp.int32))
    with evaluation(kind):
        compiled = jax.jit(lambda *a: _decode(*a), static_argnums=0).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(*args[1:]))


def timed(name: str, make, repeats: int) -> dict:
    t = median_times({kind: make(kind) for kind in ("dense", "routed")}, repeats)
    return {"name": name, "dense": t["dense"], "routed": t["routed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows, time = 4, 256
    big, eight, tiny = config(64, 8), config(8, 8), config(4, 2, **TINY)
    print(f"CPU: {machine()}; jax {jax.__version__}, {jax.devices()[0].platform}")

    flops = {(e, kind): forward_flops(cfg, kind, rows, time)
             for e, cfg in ((64, big), (8, eight)) for kind in ("routed-static", "dense")}
    print(f"\n(a) XLA FLOPs of the forward ({rows} x {time} tokens), 64 experts top-8 over 8 experts top-8")
    for kind in ("routed-static", "dense"):
        f64, f8 = flops[(64, kind)], flops[(8, kind)]
        print(f"  {kind:14s}: {f64 / 1e9:7.2f} / {f8 / 1e9:6.2f} GFLOP = {f64 / f8:.2f}x")
    print(f"  dense over routed, 64 experts: {flops[(64, 'dense')] / flops[(64, 'routed-static')]:.2f}x")
    counted, useful = ragged_dot_flops(rows * time * 8, big.hidden_size, big.moe_intermediate_size, 64)
    print(f"  jax.lax.ragged_dot on {jax.default_backend()}, [{rows * time * 8}, {big.hidden_size}] in 64 groups: "
          f"{counted / useful:.1f}x the useful FLOPs")

    results = [
        timed(f"(b) forward+backward, 64 experts top-8, {rows}x{time} tokens",
              lambda kind: train_step(big, kind, rows, time), args.repeats),
        timed("(c) decode step, 64 experts top-8, 64 rows",
              lambda kind: decode(big, kind, 64), args.repeats * 4),
        timed(f"(d) forward+backward, 4 experts top-2 (tiny), {rows}x{time} tokens",
              lambda kind: train_step(tiny, kind, rows, time), args.repeats * 4),
        timed("(d) decode step, 4 experts top-2 (tiny), 64 rows",
              lambda kind: decode(tiny, kind, 64), args.repeats * 4),
    ]
    print(f"\n{'CPU time (median seconds, in turns)':60s}   dense    routed   dense / routed")
    for r in results:
        print(f"  {r['name']:58s} {r['dense']:9.4f} {r['routed']:9.4f}   {r['dense'] / r['routed']:6.2f}x")


if __name__ == "__main__":
    main()
