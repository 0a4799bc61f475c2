"""Run report: PNG plots of the training curves and evaluations, and a short markdown summary."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["write_report", "CURVES"]

# (metric key(s), title) of the over-steps plots
CURVES = [
    (("reward_mean",), "reward"),
    (("pass@1", "pass@4", "pass@8", "pass@16"), "pass@k (training groups)"),
    (("entropy",), "entropy"),
    (("response_length_mean", "response_length_max"), "response length"),
    (("kl_ref", "approx_kl", "mismatch_kl"), "KL"),
    (("clip_frac_low", "clip_frac_high"), "clip fraction"),
]


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
        ax.set_xlabel("RL step")
        ax.set_title(title)
        if drawn > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = "curve_" + title.split(" ")[0].replace("@", "at") + ".png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _plot_passk(before: dict, after: dict, difficulties: list[int], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, table, style in (("SFT", before, "--o"), ("SFT + RL", after, "-o")):
        ks = sorted(int(k.split("@")[1]) for k in next(iter(table.values())) if k.startswith("pass@"))
        mean = [sum(table[d][f"pass@{k}"] for d in difficulties) / len(difficulties) for k in ks]
        ax.plot(ks, mean, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(f"pass@k on held-out RL difficulties {difficulties}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "passk_vs_k.png"), dpi=110)
    plt.close(fig)
    return "passk_vs_k.png"


def _plot_difficulty(before: dict, after: dict, out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ds = sorted(before)
    for label, table, style in (("SFT", before, "--"), ("SFT + RL", after, "-")):
        ax.plot(ds, [table[d]["pass@1"] for d in ds], style + "o", label=f"{label} pass@1")
        ax.plot(ds, [table[d]["pass@16"] if "pass@16" in table[d] else float("nan") for d in ds], style + "s",
                label=f"{label} pass@16", alpha=0.6)
    ax.set_xlabel("difficulty (number of operations)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs difficulty (held out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_difficulty.png"), dpi=110)
    plt.close(fig)
    return "accuracy_vs_difficulty.png"


def _table(before: dict, after: dict) -> str:
    lines = ["| difficulty | pass@1 SFT | pass@1 RL | pass@16 SFT | pass@16 RL |", "|---|---|---|---|---|"]
    for d in sorted(before):
        b, a = before[d], after[d]
        lines.append(f"| {d} | {b['pass@1']:.3f} | {a['pass@1']:.3f} | {b.get('pass@16', float('nan')):.3f} | "
                     f"{a.get('pass@16', float('nan')):.3f} |")
    return "\n".join(lines)


def write_report(out_dir: str, rl_rows: list[dict], before: dict, after: dict, rl_difficulties: list[int],
                 notes: dict | None = None) -> str:
    """Write plots and ``summary.md`` into ``out_dir``; returns the summary's path."""
    os.makedirs(out_dir, exist_ok=True)
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
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
