"""One-step-off-policy asynchronous rollouts and disaggregated sampling (the sampler on devices of its own)."""
import os

import jax
import numpy as np
import pytest
from test_trainer_rl import _cfg

from jaxrl_llm.config import ConfigError
from jaxrl_llm.trainer.rl import RLTrainer
from jaxrl_llm.tracking import read_jsonl

VARIED = 'reward.fns=[{name: format, kwargs: {pattern: "[0-9]"}}]'  # differs between samples of a random model


def _train(cfg, devices=None):
    trainer = RLTrainer(cfg, devices=devices)
    try:
        trainer.train()
        params = [np.asarray(x) for x in jax.tree.leaves(trainer.learner.params)]
    finally:
        trainer.close()
    return read_jsonl(os.path.join(cfg.log.run_dir, "metrics.jsonl")), params


def test_async_rollouts_are_one_step_stale(tiny_model_dir, tmp_path):
    rows, _ = _train(_cfg(tiny_model_dir, tmp_path, None, "train.steps=3", "checkpoint.export_hf=false", VARIED,
                          "rollout.async_rollout=true", "algorithm.rollout_is=token"))
    assert [r["rollout_staleness"] for r in rows] == [0.0, 1.0, 1.0]
    # step 1 is sampled by the policy it trains; later steps by the policy one update older, which the
    # sampler-trainer mismatch and the correction weights see
    assert rows[0]["train_sampler_abs_max"] < 1e-4
    assert min(r["train_sampler_abs_max"] for r in rows[1:]) > 1e-3
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[2]["rc_weight_mean"] != 1.0


def test_disaggregated_sampler_matches_colocated(tiny_model_dir, tmp_path):
    devices = jax.devices()
    split, split_params = _train(_cfg(tiny_model_dir, tmp_path / "split", None, "train.steps=2", "checkpoint.export_hf=false",
                           VARIED, "rollout.sampler_devices=4", "train.micro_batch_size=4"), devices)
    together, params = _train(_cfg(tiny_model_dir, tmp_path / "one", None, "train.steps=2",
                                   "checkpoint.export_hf=false", VARIED, "train.micro_batch_size=4"), devices[:4])
    for a, b in zip(split, together):
        for key in ("reward_mean", "loss", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for a, b in zip(split_params, params):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_async_and_disaggregated_settings(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="rollout.async_rollout"):
        _cfg(tiny_model_dir, tmp_path, None, "rollout.async_rollout=true", "rollout.consistency=exact")
    with pytest.raises(ValueError, match="sampler_devices=8"):
        RLTrainer(_cfg(tiny_model_dir, tmp_path, None, "rollout.sampler_devices=8"))


def test_a_lagging_sampler_reads_the_weights_of_lag_steps_before():
    from types import SimpleNamespace

    import jax.numpy as jnp

    from jaxrl_llm.trainer.rollout import RolloutEngine

    class Worker:  # collects nothing: reports which weights it was given
        def collect(self, weights):
            return SimpleNamespace(stats={}, weights=float(weights["w"]))

    engine = RolloutEngine(Worker(), asynchronous=False, lag=2)
    seen = []
    for step in range(5):
        engine.update_weights({"w": jnp.asarray(float(step))})
        batch = engine.generate()
        seen.append((batch.weights, batch.stats["rollout_staleness"]))
    assert seen == [(0.0, 0.0), (0.0, 1.0), (0.0, 2.0), (1.0, 2.0), (2.0, 2.0)]
    with pytest.raises(ValueError, match="synchronous"):
        RolloutEngine(Worker(), asynchronous=True, lag=1)


def test_a_lagging_sampler_is_seen_by_the_mismatch_metrics(tiny_model_dir, tmp_path):
    rows, _ = _train(_cfg(tiny_model_dir, tmp_path, None, "train.steps=2", "checkpoint.export_hf=false", VARIED,
                          "rollout.sampler_lag=1"))
    assert [r["rollout_staleness"] for r in rows] == [0.0, 1.0]
    assert rows[0]["train_sampler_abs_max"] < 1e-4 < 1e-3 < rows[1]["train_sampler_abs_max"]
    with pytest.raises(ConfigError, match="rollout.sampler_lag"):
        _cfg(tiny_model_dir, tmp_path, None, "rollout.sampler_lag=1", "rollout.consistency=exact")
    with pytest.raises(ConfigError, match="rollout.sampler_lag"):
        _cfg(tiny_model_dir, tmp_path, None, "rollout.sampler_lag=1", "rollout.async_rollout=true")
