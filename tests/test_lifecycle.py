"""A run's life: re-running into the same directory, stopping on SIGTERM/SIGINT and resuming exactly (sync and
async), one metrics row per step after a resume, the divergence guard, and a failing reward stopping the run."""
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_trainer_rl import _cfg, _overrides, _params

from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.errors import Diverged, Interrupted, RewardFailure, UserError
from jaxrl_llm.rewards import register_reward
from jaxrl_llm.tracking import read_jsonl
from jaxrl_llm.trainer.guard import DivergenceGuard
from jaxrl_llm.trainer.rl import RLTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIED = 'reward.fns=[{name: format, kwargs: {pattern: "[0-9]"}}]'  # differs between samples of a random model


@register_reward("digit_then_signal")
def _digit_then_signal(at: int = 0, sig: str = "SIGTERM"):
    """1 when the completion holds a digit; the ``at``-th item scored (0: none) also sends ``sig`` to this
    process, from the reward worker thread, as an outside kill would arrive in the middle of a step."""
    calls = itertools.count(1)

    def reward(prompts, completions, **_):
        if next(calls) == at:
            os.kill(os.getpid(), getattr(signal, sig))
        return [float(bool(re.search("[0-9]", c))) for c in completions]

    return reward


def _signal_reward(at: int) -> str:
    return f"reward.fns=[{{name: digit_then_signal, kwargs: {{at: {at}}}}}]"


def _clean(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k not in (
        "tokens_per_sec", "model_tflops_per_sec", "mfu")} for r in rows]


def _rows(run_dir):
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def _train(cfg, **kwargs):
    trainer = RLTrainer(cfg)
    try:
        trainer.train(**kwargs)
    finally:
        trainer.close()
    return trainer


def test_rerun_into_the_same_directory_resumes_refuses_or_overwrites(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, None, "train.steps=2", VARIED)
    first = _params(_train(cfg))
    again = RLTrainer(cfg)  # a finished run: resumed at its end, nothing to train, no second save of step 2
    try:
        assert again.step == 2 and again.train() == {}
    finally:
        again.close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    with pytest.raises(UserError, match=r"already holds checkpoints \(latest: step 2\).*checkpoint.overwrite=true"):
        RLTrainer(_cfg(tiny_model_dir, tmp_path, None, "train.steps=2", VARIED, "checkpoint.resume=false"))
    fresh = RLTrainer(_cfg(tiny_model_dir, tmp_path, None, "train.steps=2", VARIED, "checkpoint.overwrite=true"))
    try:
        assert fresh.step == 0 and fresh.checkpointer.all_steps() == []
        fresh.train()
    finally:
        fresh.close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]  # the earlier run's rows are gone, not doubled
    for x, y in zip(first, _params(fresh)):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_at_the_step_boundary_and_resume_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = _train(_cfg(tiny_model_dir, tmp_path / "a", None, _signal_reward(0), "checkpoint.export_hf=false"))
    # 16 items a step: the 20th is scored during step 2, so the run stops after saving step 2
    cut = RLTrainer(_cfg(tiny_model_dir, tmp_path / "b", None, _signal_reward(20)))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Interrupted, match="SIGTERM: checkpoint of step 2 saved") as info:
            cut.train()
    finally:
        cut.close()
    assert info.value.exit_code == 75 and info.value.step == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler is the caller's again
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [2]
    assert not os.path.exists(tmp_path / "b" / "hf")  # an interrupted run is not exported
    resumed = _train(_cfg(tiny_model_dir, tmp_path / "b", None, _signal_reward(0), "checkpoint.export_hf=false"))
    assert resumed.step == straight.step == 4
    for x, y in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(x, y)
    assert _clean(_rows(tmp_path / "a")) == _clean(_rows(tmp_path / "b"))


def test_sigint_from_another_process_stops_the_cli_with_exit_code_75(tiny_model_dir, tmp_path):
    # the shared tiny run's settings: the process can find the other tests' programs in their compilation cache
    cmd = [sys.executable, "-m", "jaxrl_llm.cli", "train", "--config", os.path.join(REPO, "configs", "grpo.yaml"),
           *_overrides(tiny_model_dir, tmp_path), "train.steps=200", VARIED]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        for _ in range(3000):  # until the first step is logged (at most 300 s)
            if proc.poll() is not None or (metrics.exists() and metrics.read_text().count("\n") >= 1):
                break
            subprocess.run(["sleep", "0.1"])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-2000:]
    assert "SIGINT received" in err and "run the same command to resume" in err.splitlines()[-1]
    steps = [r["step"] for r in _rows(tmp_path)]
    assert 1 <= len(steps) < 200 and steps == list(range(1, len(steps) + 1))
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == steps[-1]


def test_resume_drops_the_rows_logged_after_the_restored_checkpoint(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, None, "train.steps=3", "checkpoint.every=2", "checkpoint.export_hf=false",
               VARIED)
    straight = _train(cfg)
    rows = _clean(_rows(tmp_path))
    # as if killed after step 3 was logged but before its checkpoint was written
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    resumed = _train(cfg)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    assert _clean(_rows(tmp_path)) == rows
    for x, y in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(x, y)


def test_async_resume_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    extra = ("rollout.async_rollout=true", VARIED, "checkpoint.export_hf=false", "checkpoint.every=1")
    straight = _train(_cfg(tiny_model_dir, tmp_path / "a", None, *extra))
    _train(_cfg(tiny_model_dir, tmp_path / "b", None, *extra), stop_after=2)
    resumed = _train(_cfg(tiny_model_dir, tmp_path / "b", None, *extra))
    for x, y in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(x, y)
    a, b = _clean(_rows(tmp_path / "a")), _clean(_rows(tmp_path / "b"))
    assert [r["rollout_staleness"] for r in b] == [0.0, 1.0, 1.0, 1.0]  # the resumed step is one step stale too
    assert a == b


def test_a_learning_rate_that_explodes_stops_the_run_and_nothing_non_finite_is_written(tiny_model_dir, tmp_path):
    # 1e6: the weights jump but stay finite (test_user_errors.py's 1e30 takes them to inf)
    trainer = RLTrainer(_cfg(tiny_model_dir, tmp_path, None, "train.lr=1e6", VARIED, "checkpoint.every=1"))
    try:
        with pytest.raises(Diverged, match=r"step 1: one step took the weights' norm .* train.halt_weight_jump"):
            trainer.train()
        assert trainer.checkpointer.all_steps() == [] and not os.path.exists(tmp_path / "hf")
        assert Diverged.exit_code == 3
        trainer.learner.params = jax.tree.map(lambda x: x * jnp.nan, trainer.learner.params)
        with pytest.raises(Diverged, match="NaN or inf"):
            trainer.save()
        with pytest.raises(Diverged, match="NaN or inf"):
            trainer.export_hf(str(tmp_path / "export"))
        assert trainer.checkpointer.all_steps() == [] and not os.path.exists(tmp_path / "export")
    finally:
        trainer.close()


def test_divergence_rules_on_hand_made_weights():
    guard = DivergenceGuard(nonfinite_steps=3, weight_jump=1.0)
    guard.start({"w": jnp.array([3.0, 4.0])})  # norm 5
    m = {"skipped_nonfinite": 0.0}
    assert guard.inspect(1, {"w": jnp.array([6.0, 8.0])}, m) is None and m["param_norm"] == pytest.approx(10.0)
    assert "relative change 4" in str(guard.inspect(2, {"w": jnp.array([30.0, 40.0])}, {}))  # 10 -> 50
    guard.start({"w": jnp.array([3.0, 4.0])})
    same = {"w": jnp.array([3.0, 4.0])}
    assert guard.inspect(1, same, {"skipped_nonfinite": 1.0}) is None
    assert guard.inspect(2, same, {"skipped_nonfinite": 1.0}) is None
    assert guard.inspect(3, same, {"skipped_nonfinite": 0.0}) is None  # the count restarts
    assert guard.inspect(4, same, {"skipped_nonfinite": 2.0}) is None
    assert guard.inspect(5, same, {"skipped_nonfinite": 1.0}) is None
    assert "last 3 steps" in str(guard.inspect(6, same, {"skipped_nonfinite": 1.0}))
    assert "NaN or inf" in str(guard.inspect(7, {"w": jnp.array([3.0, jnp.inf])}, {}))
    off = DivergenceGuard(nonfinite_steps=0, weight_jump=0.0)
    off.start(same)
    assert off.inspect(1, {"w": jnp.array([300.0, 400.0])}, {"skipped_nonfinite": 1.0}) is None


def test_a_reward_function_that_always_raises_stops_the_run_with_its_traceback(tiny_model_dir, tmp_path):
    trainer = RLTrainer(_cfg(tiny_model_dir, tmp_path, None, 'reward.fns=[{name: "os.path:join"}]',
                             "checkpoint.every=1"))
    try:
        with pytest.raises(RewardFailure, match=r"'os.path:join' failed on 16 of 16 items .* step 1") as info:
            trainer.train()
    finally:
        trainer.close()
    assert info.value.exit_code == 4
    assert "Traceback" in info.value.details and "TypeError" in info.value.details
    assert trainer.checkpointer.all_steps() == [] and not os.path.exists(tmp_path / "hf")
