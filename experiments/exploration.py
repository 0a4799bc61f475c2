"""Exploration remedies on the main-job task: GRPO vs GRPO + Clip-Cov vs GRPO + KL-Cov vs a BuPO warm-up.

Same SFT checkpoint, seed and budget (the main job's 40 GRPO steps x 16 prompts x 8 samples) for every variant;
entropy, per-layer read-out entropy and pass@k over steps; final held-out pass@1 / pass@16 (mean over
difficulties 1-8). Writes plots to docs/img/ and a table to docs/experiments.md.

    python experiments/exploration.py [--seed 0] [--run-root runs/exp_exploration]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, Setup, mean_of, plot_grid, say, write_section  # noqa: E402

VARIANTS = {
    "grpo": [],
    "clip_cov": ["algorithm.cov_penalty=clip_cov", "algorithm.clip_cov_ratio=0.01"],
    "kl_cov": ["algorithm.cov_penalty=kl_cov", "algorithm.kl_cov_ratio=0.01"],
    "bupo": ["algorithm.bupo_layer=1", "algorithm.bupo_steps=8"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-root", default=os.path.join(ROOT, "runs", "exp_exploration"))
    ap.add_argument("--sft-dir", default=None, help="reuse this SFT checkpoint (made with the recipe of experiments/common.py)")
    args = ap.parse_args(argv)
    setup = Setup(args.run_root, args.seed, sft_dir=args.sft_dir)
    setup.ensure_sft()
    sft = setup.evaluate_sft()
    say(f"SFT: pass@1 {sft['pass@1']:.3f}, pass@16 {sft['pass@16']:.3f}")
    runs, results = {}, {}
    for name, overrides in VARIANTS.items():
        rows, result, seconds = setup.run_variant(name, ["log.layer_entropy=true", *overrides])
        runs[name], results[name] = rows, (result, seconds)
    img = os.path.join(ROOT, "docs", "img", "exploration.png")
    plot_grid(runs, [("entropy", "policy entropy (per token)"), ("reward_mean", "reward"),
                     ("pass@8", "training pass@8 (rollouts)"), ("layer_entropy/1", "read-out entropy, layer 1"),
                     ("cov_selected", "tokens selected by Clip-/KL-Cov"), ("response_length_mean", "response length")],
              img, f"Exploration remedies, seed {args.seed}")
    lines = [
        f"Seed {args.seed}; SFT checkpoint: held-out pass@1 {sft['pass@1']:.3f}, pass@16 {sft['pass@16']:.3f} "
        "(mean over difficulties 1-8, 48 problems each, 16 samples at temperature 1).",
        "",
        "| variant | switches | final pass@1 | final pass@16 | entropy, first 5 steps | entropy, last 5 steps | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, overrides in VARIANTS.items():
        result, seconds = results[name]
        rows = runs[name]
        lines.append(f"| {name} | `{' '.join(overrides) or '-'}` | {result['pass@1']:.3f} | {result['pass@16']:.3f} "
                     f"| {mean_of(rows[:5], 'entropy'):.3f} | {mean_of(rows, 'entropy', last=5):.3f} | {seconds:.0f} |")
    lines += ["", f"![exploration](img/{os.path.basename(img)})", "",
              f"Reproduce: `python experiments/exploration.py --seed {args.seed}`"]
    write_section(f"exploration-seed{args.seed}", "\n".join(lines))
    say(f"table written to docs/experiments.md, plot to {img}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
