"""The run report: every plot and the summary are written."""
import os

from jaxrl_llm.report import CURVES, write_report


def test_report_has_all_plots(tmp_path):
    rows = [{"step": s, "reward_mean": 0.1 * s, "pass@1": 0.1 * s, "pass@16": 0.5, "entropy": 1.0 / s,
             "response_length_mean": 20, "response_length_max": 30, "kl_ref": 0.01 * s, "clip_frac_low": 0.0,
             "clip_frac_high": 0.01} for s in range(1, 6)]
    ks = {f"pass@{k}": 0.1 * k for k in (1, 2, 4, 8, 16)}
    before = {d: dict(ks) for d in (1, 2, 3)}
    after = {d: {k: min(1.0, v + 0.2) for k, v in ks.items()} for d in (1, 2, 3)}
    path = write_report(str(tmp_path), rows, before, after, [2, 3], {"model": "tiny"})
    files = set(os.listdir(tmp_path))
    assert {"passk_vs_k.png", "accuracy_vs_difficulty.png", "summary.md"} <= files
    assert len([f for f in files if f.startswith("curve_")]) == len(CURVES)
    text = open(path).read()
    assert "| pass@1 | 0.100 | 0.300 | +0.200 |" in text
    for f in files - {"summary.md"}:
        assert f"]({f})" in text
        assert os.path.getsize(tmp_path / f) > 1000


def test_train_run_report_and_the_report_command(tmp_path):
    import json

    from jaxrl_llm.cli import main
    from jaxrl_llm.report import write_train_report

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward_mean": 0.1 * s, "pass@1": 0.05 * s, "pass@4": 0.1 * s, "entropy": 1.0 / s}
            for s in range(1, 7)]
    for s, p in ((2, 0.2), (4, 0.5), (6, 0.4)):
        rows[s - 1].update({"eval/pass@1": p, "eval/pass@4": min(1.0, 2 * p), "eval/reward_mean": p})
    rows.append(dict(rows[3], reward_mean=9.9))  # step 4 logged again after a resume: the later row counts
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "config.yaml").write_text("model: {path: m}\nalgorithm: {name: grpo}\ndata: {source: jsonl, path: d.jsonl}"
                                     "\ntrain: {steps: 6, prompts_per_step: 2}\nrollout: {n: 4}\n")
    path = write_train_report(str(run))
    text = open(path).read()
    assert "| eval/pass@1 | 0.200 | 0.400 | 0.500 | 4 |" in text  # first, last, best and its step
    assert "- **data**: jsonl d.jsonl" in text
    # training rows of the first and last 5 steps: step 4's reward is the re-logged 9.9
    assert f"| reward_mean | {(0.1 + 0.2 + 0.3 + 9.9 + 0.5) / 5:.3f} |" in text
    files = set(os.listdir(run / "report"))
    assert {"curve_eval.png", "passk_vs_k.png", "summary.md"} <= files
    assert len([f for f in files if f.startswith("curve_")]) == len(CURVES) + 1
    # the command: same report, another place; a directory without metrics is an error
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert open(tmp_path / "elsewhere" / "summary.md").read() == text
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_pipeline_run_report_is_rebuilt(tmp_path):
    import json

    from jaxrl_llm.report import report_run_dir

    (tmp_path / "rl").mkdir()
    ks = {f"pass@{k}": 0.1 * k for k in (1, 2, 4, 8, 16)}
    (tmp_path / "eval_sft.json").write_text(json.dumps({str(d): ks for d in (1, 2)}))
    (tmp_path / "eval_rl.json").write_text(json.dumps({str(d): {k: v + 0.1 for k, v in ks.items()} for d in (1, 2)}))
    (tmp_path / "rl" / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    (tmp_path / "rl" / "config.yaml").write_text("data: {task_kwargs: {difficulties: [2]}}\n")
    text = open(report_run_dir(str(tmp_path))).read()
    assert "on the RL difficulties [2]" in text and "| pass@1 | 0.100 | 0.200 | +0.100 |" in text
