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
