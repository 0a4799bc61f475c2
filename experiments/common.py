"""Shared machinery of the experiments on the main-job task.

One SFT checkpoint per (seed, architecture) from ``configs/main.yaml`` (with ``LEGACY_RECIPE`` for the older tables),
then RL variants from it with the main job's RL settings plus the variant's config overrides, a held-out
evaluation of every variant, plots, and a markdown section in ``docs/experiments.md``. Finished runs are reused when a script is run
again (delete the run directory to redo one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from jaxrl_llm.pipeline import load_pipeline_config, rl_difficulties, rl_overrides, run_sft_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DOC = os.path.join(ROOT, "docs", "experiments.md")


# The recipe the consistency tables were measured with: the main job's configs/main.yaml as it was then (fewer
# slips, a shorter SFT, RL on every difficulty with a fixed overlong window), kept so their command reproduces them.
LEGACY_RECIPE = ("sft.slip_rate=0.2", "sft.steps=400")
LEGACY_RL_RECIPE = ("algorithm.overlong_cache=16",)


def say(msg: str) -> None:
    print(f"[experiments] {msg}", flush=True)


class Setup:
    """The main job's task, tokenizer, SFT policy and evaluation problems for one seed.

    ``legacy=False`` runs the main job's own recipe: the SFT stage of ``configs/main.yaml``, RL on the difficulties
    the pipeline picks from the SFT evaluation, the RL stage's overrides; a variant with no overrides of its own is
    then the main job's RL stage. ``legacy=True`` is the older recipe of the consistency tables (RL on every
    evaluated difficulty)."""

    def __init__(self, run_root: str, seed: int = 0, model_overrides: tuple[str, ...] = (), sft_dir: str | None = None,
                 legacy: bool = True):
        from jaxrl_llm.tasks import ArithTask
        from jaxrl_llm.tokenizer import build_char_tokenizer

        recipe = LEGACY_RECIPE if legacy else ()
        self.rl_recipe = LEGACY_RL_RECIPE if legacy else ()
        self.legacy = legacy
        self.cfg = load_pipeline_config(os.path.join(CONFIGS, "main.yaml"),
                                        [f"seed={seed}", f"run_dir={run_root}", *recipe, *model_overrides])
        self.run_root = run_root
        os.makedirs(run_root, exist_ok=True)
        self.task = ArithTask(1, max(self.cfg.eval.difficulties + self.cfg.sft.difficulties),
                              **dataclasses.asdict(self.cfg.task))
        self.tok = build_char_tokenizer()
        self.sft_dir = sft_dir or os.path.join(run_root, "sft")
        self.eval_difficulties = list(self.cfg.eval.difficulties)
        self.problems = {d: self.task.split("eval", self.cfg.eval.problems, seed=seed, difficulties=(d,))
                         for d in self.eval_difficulties}

    @property
    def difficulties(self) -> list[int]:
        """The difficulties RL trains on."""
        if self.legacy:
            return self.eval_difficulties
        return rl_difficulties(self.cfg, self.evaluate_sft_table())

    def ensure_sft(self) -> None:
        if os.path.exists(os.path.join(self.sft_dir, "config.json")):
            say(f"reusing the SFT checkpoint in {self.sft_dir}")
            return
        say(f"SFT -> {self.sft_dir}")
        t0 = time.perf_counter()
        _, losses = run_sft_stage(self.cfg, self.task, self.tok, self.sft_dir, None)
        say(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t0:.0f} s")

    def evaluate_table(self, model) -> dict[int, dict[str, float]]:
        """Held-out ``{difficulty: {"pass@k": ...}}`` exactly as the main job evaluates."""
        from jaxrl_llm.evaluate import evaluate_pass_at_k

        c = self.cfg
        return evaluate_pass_at_k(model, self.tok, self.problems, n=c.eval.n, temperature=c.eval.temperature,
                                  max_new_tokens=c.max_new_tokens, prompt_len=c.prompt_len, seed=c.seed)

    def summary(self, table: dict) -> dict:
        """Mean held-out pass@1 and pass@16 over the evaluated difficulties."""
        return {k: float(np.mean([table[d][k] for d in self.eval_difficulties])) for k in ("pass@1", "pass@16")}

    def evaluate(self, model) -> dict:
        return self.summary(self.evaluate_table(model))

    def evaluate_sft_table(self) -> dict[int, dict[str, float]]:
        path = os.path.join(self.run_root, "eval_sft_table.json")
        if os.path.exists(path):
            return {int(d): r for d, r in json.load(open(path)).items()}
        from jaxrl_llm.models import load_hf

        model, _ = load_hf(self.sft_dir)
        table = self.evaluate_table(model)
        json.dump(table, open(path, "w"), indent=1)
        return table

    def evaluate_sft(self) -> dict:
        return self.summary(self.evaluate_sft_table())

    def run_variant(self, name: str, overrides: list[str]) -> tuple[list[dict], dict, float]:
        """RL from the SFT checkpoint with the main job's settings + ``overrides``; returns (metric rows,
        held-out per-difficulty table, wall seconds)."""
        from jaxrl_llm.config import load_config
        from jaxrl_llm.tracking import read_jsonl
        from jaxrl_llm.trainer.rl import train

        out = os.path.join(self.run_root, name)
        done = os.path.join(out, "result.json")
        if os.path.exists(done):
            saved = json.load(open(done))
            table = {int(d): r for d, r in saved["table"].items()}
            return read_jsonl(os.path.join(out, "metrics.jsonl")), table, saved["seconds"]
        base = rl_overrides(self.cfg, self.task, self.tok, self.sft_dir, out, self.difficulties)
        cfg = load_config(os.path.join(CONFIGS, f"{self.cfg.rl.preset}.yaml"),
                          [*base, *self.rl_recipe, "checkpoint.export_hf=false", "log.progress=false", *overrides])
        say(f"{name}: {' '.join(overrides) or '(main-job GRPO)'}")
        t0 = time.perf_counter()
        _, model = train(cfg, return_model=True)
        seconds = time.perf_counter() - t0
        table = self.evaluate_table(model)
        result = self.summary(table)
        say(f"{name}: pass@1 {result['pass@1']:.3f}, pass@16 {result['pass@16']:.3f} ({seconds:.0f} s)")
        json.dump({"table": table, "seconds": seconds, "overrides": overrides}, open(done, "w"), indent=1)
        return read_jsonl(os.path.join(out, "metrics.jsonl")), table, seconds


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


_STYLES = ("-", "--", ":")  # after matplotlib's ten colours, the same colours dashed, then dotted


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
                ax.plot(x, y, label=name, lw=1.4, color=f"C{i % 10}", ls=_STYLES[i // 10 % 3])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i % 10}", ls=_STYLES[i // 10 % 3], label=name)
               for i, name in enumerate(runs)]
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
