"""Shared machinery of the experiments on the main-job task.

One SFT checkpoint per (seed, architecture) from the experiments' recipe (``configs/main.yaml`` with ``RECIPE``),
then RL variants from it with the main job's GRPO settings plus the variant's config overrides, a held-out
evaluation of every variant, plots, and a markdown section in ``docs/experiments.md``. Finished runs are reused when a script is run
again (delete the run directory to redo one).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from jaxrl_llm.pipeline import load_pipeline_config, rl_overrides, run_sft_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DOC = os.path.join(ROOT, "docs", "experiments.md")


# The recipe the documented tables were measured with: the main job's configs/main.yaml as it was then (fewer
# slips, a shorter SFT, RL on every difficulty with a fixed overlong window), kept so the commands reproduce them.
RECIPE = ("sft.slip_rate=0.2", "sft.steps=400")
RL_RECIPE = ("algorithm.overlong_cache=16",)


def say(msg: str) -> None:
    print(f"[experiments] {msg}", flush=True)


class Setup:
    """The main job's task, tokenizer, SFT policy and evaluation problems for one seed."""

    def __init__(self, run_root: str, seed: int = 0, model_overrides: tuple[str, ...] = (), sft_dir: str | None = None):
        from jaxrl_llm.tasks import ArithTask
        from jaxrl_llm.tokenizer import build_char_tokenizer

        self.cfg = load_pipeline_config(os.path.join(CONFIGS, "main.yaml"),
                                        [f"seed={seed}", f"run_dir={run_root}", *RECIPE, *model_overrides])
        self.run_root = run_root
        os.makedirs(run_root, exist_ok=True)
        self.task = ArithTask(1, max(self.cfg.eval.difficulties + self.cfg.sft.difficulties),
                              self.cfg.task.num_literals, self.cfg.task.operands)
        self.tok = build_char_tokenizer()
        self.sft_dir = sft_dir or os.path.join(run_root, "sft")
        self.difficulties = list(self.cfg.eval.difficulties)  # RL on all of them (the recipe's edge band then)
        self.problems = {d: self.task.split("eval", self.cfg.eval.problems, seed=seed, difficulties=(d,))
                         for d in self.difficulties}

    def ensure_sft(self) -> None:
        if os.path.exists(os.path.join(self.sft_dir, "config.json")):
            say(f"reusing the SFT checkpoint in {self.sft_dir}")
            return
        say(f"SFT -> {self.sft_dir}")
        t0 = time.perf_counter()
        _, losses = run_sft_stage(self.cfg, self.task, self.tok, self.sft_dir, None)
        say(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t0:.0f} s")

    def evaluate(self, model) -> dict:
        """Mean held-out pass@1 and pass@16 over the RL difficulties."""
        from jaxrl_llm.evaluate import evaluate_pass_at_k

        c = self.cfg
        table = evaluate_pass_at_k(model, self.tok, self.problems, n=c.eval.n, temperature=c.eval.temperature,
                                   max_new_tokens=c.max_new_tokens, prompt_len=c.prompt_len, seed=c.seed)
        return {k: float(np.mean([table[d][k] for d in self.difficulties])) for k in ("pass@1", "pass@16")}

    def evaluate_sft(self) -> dict:
        path = os.path.join(self.run_root, "eval_sft.json")
        if os.path.exists(path):
            return json.load(open(path))
        from jaxrl_llm.models import load_hf

        model, _ = load_hf(self.sft_dir)
        result = self.evaluate(model)
        json.dump(result, open(path, "w"))
        return result

    def run_variant(self, name: str, overrides: list[str]) -> tuple[list[dict], dict, float]:
        """RL from the SFT checkpoint with the main job's settings + ``overrides``; returns (metric rows,
        held-out result, wall seconds)."""
        from jaxrl_llm.config import load_config
        from jaxrl_llm.tracking import read_jsonl
        from jaxrl_llm.trainer.rl import train

        out = os.path.join(self.run_root, name)
        done = os.path.join(out, "result.json")
        if os.path.exists(done):
            saved = json.load(open(done))
            return read_jsonl(os.path.join(out, "metrics.jsonl")), saved["eval"], saved["seconds"]
        base = rl_overrides(self.cfg, self.task, self.tok, self.sft_dir, out, self.difficulties)
        cfg = load_config(os.path.join(CONFIGS, f"{self.cfg.rl.preset}.yaml"),
                          [*base, *RL_RECIPE, "checkpoint.export_hf=false", "log.progress=false", *overrides])
        say(f"{name}: {' '.join(overrides) or '(main-job GRPO)'}")
        t0 = time.perf_counter()
        _, model = train(cfg, return_model=True)
        seconds = time.perf_counter() - t0
        result = self.evaluate(model)
        say(f"{name}: pass@1 {result['pass@1']:.3f}, pass@16 {result['pass@16']:.3f} ({seconds:.0f} s)")
        json.dump({"eval": result, "seconds": seconds, "overrides": overrides}, open(done, "w"))
        return read_jsonl(os.path.join(out, "metrics.jsonl")), result, seconds


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_grid(runs: dict[str, list[dict]], keys: list[tuple[str, str]], path: str, title: str) -> str:
    """One panel per ``(metric key, label)``, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, keys):
        for i, (name, metric_rows) in enumerate(runs.items()):
            x, y = series(metric_rows, key)
            if x:  # a fixed colour per run, also in panels where some runs have no such metric
                ax.plot(x, y, label=name, lw=1.4, color=f"C{i}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i}", label=name) for i, name in enumerate(runs)]
    axes.flat[0].legend(handles=handles, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_of(rows: list[dict], key: str, last: int | None = None) -> float:
    vals = [r[key] for r in rows if key in r]
    if last:
        vals = vals[-last:]
    return float(np.mean(vals)) if vals else float("nan")


def write_section(name: str, markdown: str) -> None:
    """Replace the section between ``<!-- name -->`` markers in docs/experiments.md (created if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(DOC).read() if os.path.exists(DOC) else "# Experiments\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)
