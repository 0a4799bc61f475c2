"""How much of the GRPO benchmark's update step is matrix products (CPU).

Compiles the trainer's update for the batch of `benchmarks/grpo_step.py`, then times, in turns in one process:
  - the update itself,
  - every matrix product (`dot`) of that compiled program, same shapes and dimension numbers, run alone in one
    program (what the update would cost if everything else were free),
  - one large product, `[2560, 256] x [256, 768]`, repeated to the same arithmetic (the machine's product rate).
Prints the seconds, the products' share of the update and the GFLOP/s of each.

    python benchmarks/update_products.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_step import benchmark_trainer, build_model  # noqa: E402
from timing import median_times  # noqa: E402

from jaxrl_llm.compile_options import compiler_options  # noqa: E402

_DEF = re.compile(r"%(\S+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"%\S+ = f32\[([\d,]*)\]\S* dot\(%([^,\s]+), %([^,\s)]+)\)([^\n]*)")


def _dims(text: str, name: str) -> tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", text)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def products_of(hlo: str) -> list[tuple]:
    """``(lhs shape, rhs shape, dimension numbers, flops)`` of every f32 ``dot`` in compiled HLO text."""
    shapes = {m.group(1): tuple(int(x) for x in m.group(2).split(",") if x) for m in _DEF.finditer(hlo)}
    out = []
    for m in _DOT.finditer(hlo):
        result, lhs, rhs, attrs = m.groups()
        a, b = shapes[lhs], shapes[rhs]
        contract = (_dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims"))
        batch = (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims"))
        k = int(np.prod([a[i] for i in contract[0]]))
        flops = 2 * k * int(np.prod([int(x) for x in result.split(",") if x]))
        out.append((a, b, (contract, batch), flops))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir)
        trainer = benchmark_trainer(model_dir, os.path.join(tmp, "run"), steps=2)
        captured = {}
        update = trainer.learner._update

        def spy(*a):
            captured["args"] = a
            return update(*a)

        trainer.learner._update = spy
        try:
            trainer.train_step()
            with trainer.layout.active():
                _, rest, _, micro, norm, control = captured["args"]
                learner = trainer.learner
                compiled = update.lower(learner.params, rest, learner.opt_state, micro, norm, control).compile()
                products = products_of(compiled.as_text())
                state = {"params": trainer.learner.params, "opt": trainer.learner.opt_state}

                def run_update():
                    # the update donates its parameter and optimizer buffers: carry the new ones forward
                    p, o, m = compiled(state["params"], rest, state["opt"], micro, norm, control)
                    jax.block_until_ready(m)
                    state["params"], state["opt"] = p, o

                rng = np.random.default_rng(0)
                operands = [(jnp.asarray(rng.standard_normal(a), jnp.float32),
                             jnp.asarray(rng.standard_normal(b), jnp.float32)) for a, b, _, _ in products]
                dnums = [d for _, _, d, _ in products]
                alone = jax.jit(lambda ops: [jax.lax.dot_general(x, y, d) for (x, y), d in zip(ops, dnums)],
                                compiler_options=compiler_options())
                flops = sum(f for *_, f in products)
                big = (jnp.asarray(rng.standard_normal((2560, 256)), jnp.float32),
                       jnp.asarray(rng.standard_normal((256, 768)), jnp.float32))
                big_flops = 2 * 2560 * 256 * 768
                reps = max(1, round(flops / big_flops))
                large = jax.jit(lambda x, w: [x @ (w + i) for i in range(reps)], compiler_options=compiler_options())
                t = median_times({"update": run_update,
                                  "products": lambda: jax.block_until_ready(alone(operands)),
                                  "large": lambda: jax.block_until_ready(large(*big))}, args.repeats, pause=0.3)
        finally:
            trainer.close()
    gflop = flops / 1e9
    print(f"GRPO benchmark update (8 prompts x 8 samples, <= 64 new tokens, tiny Qwen3 fp32, CPU): "
          f"{len(products)} matrix products, {gflop:.1f} GFLOP")
    print(f"update                : {t['update']:.3f} s  ({gflop / t['update']:.0f} GFLOP/s over its products)")
    print(f"its products alone    : {t['products']:.3f} s  ({gflop / t['products']:.0f} GFLOP/s), "
          f"{t['products'] / t['update']:.0%} of the update")
    print(f"large products, same arithmetic: {t['large']:.3f} s  ({reps * big_flops / 1e9 / t['large']:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
