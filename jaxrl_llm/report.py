"""Run report: PNG plots of the training curves and evaluations, and a short markdown summary.

Two kinds of run directory (local or a URI, :mod:`jaxrl_llm.paths`), one report each (:func:`report_run_dir`,
``jaxrl-llm report RUN_DIR``):

* a ``jaxrl-llm pipeline`` run: curves of the RL stage, pass@k against k and accuracy against difficulty before
  and after RL (:func:`write_report`);
* a ``jaxrl-llm train`` run: the same curves, the evaluation metrics over steps and pass@k against k at the first
  and last evaluation (``eval.every``; without evaluations, the training groups' pass@k of the first and last
  step), with a table of first, last and best evaluation (:func:`write_train_report`).
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxrl_llm import paths  # noqa: E402

__all__ = ["write_report", "write_train_report", "report_run_dir", "CURVES"]

# (metric key(s), title) of the over-steps plots
CURVES = [
    (("reward_mean",), "reward"),
    (("pass@1", "pass@4", "pass@8", "pass@16"), "pass@k (training groups)"),
    (("entropy",), "entropy"),
    (("response_length_mean", "response_length_max"), "response length"),
    (("kl_ref", "approx_kl", "train_sampler_kl"), "KL"),
    (("clip_frac_low", "clip_frac_high"), "clip fraction"),
]


def _save(fig, ax, out_dir: str, name: str, *, xlabel: str, title: str, ylabel: str | None = None,
          legend: bool = True, legend_size: int | None = None) -> str:
    """Label and title the axes, add the legend (in font size ``legend_size``, default: matplotlib's), then write
    the figure as ``out_dir/name`` and close it; returns ``name``."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(**({} if legend_size is None else {"fontsize": legend_size}))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _plot_curves(rows: list[dict], out_dir: str) -> list[str]:
    files = []
    steps = [r["step"] for r in rows]
    for keys, title in CURVES:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        drawn = 0
        for key in keys:
            ys = [r.get(key) for r in rows]
            if any(isinstance(y, (int, float)) for y in ys):
                ax.plot(steps, [y if isinstance(y, (int, float)) else float("nan") for y in ys], label=key)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes)
        name = "curve_" + title.split(" ")[0].replace("@", "at") + ".png"
        files.append(_save(fig, ax, out_dir, name, xlabel="RL step", title=title, legend=drawn > 1, legend_size=7))
    return files


def _plot_passk(before: dict, after: dict, difficulties: list[int], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, table, style in (("SFT", before, "--o"), ("SFT + RL", after, "-o")):
        ks = sorted(int(k.split("@")[1]) for k in next(iter(table.values())) if k.startswith("pass@"))
        mean = [sum(table[d][f"pass@{k}"] for d in difficulties) / len(difficulties) for k in ks]
        ax.plot(ks, mean, style, label=label)
    ax.set_xscale("log", base=2)
    return _save(fig, ax, out_dir, "passk_vs_k.png", xlabel="k", ylabel="pass@k",
                 title=f"pass@k on held-out RL difficulties {difficulties}")


def _plot_difficulty(before: dict, after: dict, out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ds = sorted(before)
    for label, table, style in (("SFT", before, "--"), ("SFT + RL", after, "-")):
        ax.plot(ds, [table[d]["pass@1"] for d in ds], style + "o", label=f"{label} pass@1")
        ax.plot(ds, [table[d]["pass@16"] if "pass@16" in table[d] else float("nan") for d in ds], style + "s",
                label=f"{label} pass@16", alpha=0.6)
    return _save(fig, ax, out_dir, "accuracy_vs_difficulty.png", xlabel="difficulty (number of operations)",
                 ylabel="accuracy", title="accuracy vs difficulty (held out)", legend_size=7)


def _table(before: dict, after: dict) -> str:
    lines = ["| difficulty | pass@1 SFT | pass@1 RL | pass@16 SFT | pass@16 RL |", "|---|---|---|---|---|"]
    for d in sorted(before):
        b, a = before[d], after[d]
        lines.append(f"| {d} | {b['pass@1']:.3f} | {a['pass@1']:.3f} | {b.get('pass@16', float('nan')):.3f} | "
                     f"{a.get('pass@16', float('nan')):.3f} |")
    return "\n".join(lines)


def write_report(out_dir: str, rl_rows: list[dict], before: dict, after: dict, rl_difficulties: list[int],
                 notes: dict | None = None) -> str:
    """Write plots and ``summary.md`` of a pipeline run into ``out_dir``; returns the summary's path."""
    with paths.staged_output(out_dir) as local:
        _write_report(local, rl_rows, before, after, rl_difficulties, notes)
    return paths.join(out_dir, "summary.md")


def _write_report(out_dir: str, rl_rows: list[dict], before: dict, after: dict, rl_difficulties: list[int],
                  notes: dict | None) -> None:
    files = _plot_curves(rl_rows, out_dir) if rl_rows else []
    files.append(_plot_passk(before, after, rl_difficulties, out_dir))
    files.append(_plot_difficulty(before, after, out_dir))

    def mean(table, key):
        return sum(table[d][key] for d in rl_difficulties) / len(rl_difficulties)

    lines = ["# jaxrl_llm run report", ""]
    for key, value in (notes or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", f"## Held-out accuracy on the RL difficulties {rl_difficulties}", "",
              "| | SFT | SFT + RL | change |", "|---|---|---|---|"]
    for key in ("pass@1", "pass@16"):
        if key in after[rl_difficulties[0]]:
            b, a = mean(before, key), mean(after, key)
            lines.append(f"| {key} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    lines += ["", "## Every difficulty", "", _table(before, after), "", "## Plots", ""]
    lines += [f"![{f}]({f})" for f in files]
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---- train runs -----------------------------------------------------------------------------------------------

def _eval_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("eval/pass@")}
    return sorted(keys, key=lambda k: int(k.split("@")[1]))


def _plot_eval(rows: list[dict], out_dir: str) -> str:
    evals = [r for r in rows if "eval/pass@1" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in _eval_keys(evals) + ["eval/reward_mean"]:
        ax.plot([r["step"] for r in evals], [r.get(key, float("nan")) for r in evals], "-o", label=key, ms=3)
    return _save(fig, ax, out_dir, "curve_eval.png", xlabel="RL step", title="held-out evaluation", legend_size=7)


def _plot_passk_steps(first: dict, last: dict, prefix: str, out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for row, style in ((first, "--o"), (last, "-o")):
        ks = sorted(int(k.split("@")[1]) for k in row if k.startswith(prefix + "pass@"))
        ax.plot(ks, [row[f"{prefix}pass@{k}"] for k in ks], style, label=f"step {row['step']}")
    ax.set_xscale("log", base=2)
    return _save(fig, ax, out_dir, "passk_vs_k.png", xlabel="k", ylabel="pass@k",
                 title="pass@k, " + ("held-out prompts" if prefix else "training groups"))


def _config_notes(run_dir: str) -> dict:
    path = paths.join(run_dir, "config.yaml")
    if not paths.exists(path):
        return {}
    import yaml

    cfg = yaml.safe_load(paths.read_text(path)) or {}
    d, a, t, r = (cfg.get(k, {}) for k in ("data", "algorithm", "train", "rollout"))
    data = f"{d.get('source')} {d.get('path') or d.get('task')}"
    return {"model": cfg.get("model", {}).get("path"), "algorithm": a.get("name"), "data": data,
            "steps": f"{t.get('steps')} x {t.get('prompts_per_step')} prompts x {r.get('n')} samples"}


def _eval_table(evals: list[dict]) -> list[str]:
    keys = _eval_keys(evals) + [k for k in ("eval/reward_mean", "eval/accuracy") if k in evals[0]]
    lines = ["| metric | first (step {}) | last (step {}) | best | best step |".format(evals[0]["step"],
                                                                                     evals[-1]["step"]),
             "|---|---|---|---|---|"]
    for key in keys:
        best = max(reversed(evals), key=lambda r: r.get(key, float("-inf")))  # a tie: the later step, as kept
        lines.append(f"| {key} | {evals[0][key]:.3f} | {evals[-1][key]:.3f} | {best[key]:.3f} | {best['step']} |")
    return lines


def write_train_report(run_dir: str, out_dir: str | None = None) -> str:
    """Plots and ``summary.md`` of a ``jaxrl-llm train`` run (default ``<run_dir>/report``); the summary's path."""
    from jaxrl_llm.tracking import read_metrics

    out_dir = out_dir or paths.join(run_dir, "report")
    metrics = paths.join(run_dir, "metrics.jsonl")
    if not paths.exists(metrics):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: not a training run directory")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics} holds no rows")
    train_rows = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    lines = ["# jaxrl_llm run report", ""]
    lines += [f"- **{k}**: {v}" for k, v in {"run": run_dir, **_config_notes(run_dir)}.items()]
    with paths.staged_output(out_dir) as local:
        files = _plot_curves(train_rows, local) if train_rows else []
        if evals:
            files.append(_plot_eval(rows, local))
            files.append(_plot_passk_steps(evals[0], evals[-1], "eval/", local))
            lines += ["", "## Held-out evaluation", ""] + _eval_table(evals)
        elif train_rows:
            files.append(_plot_passk_steps(train_rows[0], train_rows[-1], "", local))
        if train_rows:
            head, tail = train_rows[:5], train_rows[-5:]

            def mean(part, key):
                vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
                return sum(vals) / len(vals) if vals else float("nan")

            lines += ["", "## Training", "", "| | first 5 steps | last 5 steps |", "|---|---|---|"]
            for key in ("reward_mean", "pass@1", "entropy", "response_length_mean"):
                lines.append(f"| {key} | {mean(head, key):.3f} | {mean(tail, key):.3f} |")
        lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
        with open(os.path.join(local, "summary.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths.join(out_dir, "summary.md")


def report_run_dir(run_dir: str, out_dir: str | None = None) -> str:
    """The report of a pipeline run directory or of a training run directory; the summary's path."""
    pipeline_files = [paths.join(run_dir, f) for f in ("eval_sft.json", "eval_rl.json", "rl/metrics.jsonl")]
    if not all(paths.exists(f) for f in pipeline_files):
        return write_train_report(run_dir, out_dir)
    from jaxrl_llm.tracking import read_metrics

    before, after = ({int(d): v for d, v in json.loads(paths.read_text(f)).items()} for f in pipeline_files[:2])
    import yaml

    rl_cfg = yaml.safe_load(paths.read_text(paths.join(run_dir, "rl", "config.yaml")))
    difficulties = list(rl_cfg["data"]["task_kwargs"].get("difficulties") or sorted(before))
    return write_report(out_dir or paths.join(run_dir, "report"), read_metrics(pipeline_files[2]), before, after,
                        difficulties, {"run": run_dir})
