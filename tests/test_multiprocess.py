"""Multi-process training: 2 processes x 4 CPU devices (collectives over loopback) against 1 process x 8 devices,
and a 2-process resume from a checkpoint. Runs `launch/multiprocess_cpu.sh`, the same path as a cluster launch."""
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrl_llm.config import load_config
from jaxrl_llm.trainer.rl import RLTrainer
from jaxrl_llm.tracking import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _overrides(model_dir, run_dir, steps=3):
    return [f"model.path={model_dir}", f"log.run_dir={run_dir}", f"train.steps={steps}", "train.prompts_per_step=4",
            "rollout.n=4", "rollout.max_new_tokens=12", "train.micro_batch_size=8", "data.max_prompt_tokens=40",
            "data.task_kwargs={num_problems: 64, max_ops: 2}", "train.lr=1e-3", "log.tensorboard=false",
            "log.progress=false", "checkpoint.async_save=false", "checkpoint.every=2",
            "mesh.fsdp=2", "mesh.tensor=2",
            # a reward that differs between samples of a random model, so every step moves the parameters
            'reward.fns=[{name: format, kwargs: {pattern: "[0-9]"}}]']


def _launch(overrides, nproc=2, devices=4):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = ["bash", os.path.join(REPO, "launch", "multiprocess_cpu.sh"), str(nproc), str(devices),
           "--config", os.path.join(REPO, "configs", "grpo.yaml"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(run_dir):
    out = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "hf", "*.safetensors"))):
        out.update(load_file(f))
    assert out
    return out


def _close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=0, err_msg=k)


def test_two_processes_match_one_and_resume(tiny_model_dir, tmp_path):
    multi = str(tmp_path / "multi")
    out = _launch(_overrides(tiny_model_dir, multi))
    assert out.stdout.count('"loss"') == 1  # only process 0 prints the final metrics

    single = str(tmp_path / "single")
    trainer = RLTrainer(load_config(os.path.join(REPO, "configs", "grpo.yaml"), _overrides(tiny_model_dir, single)))
    try:
        trainer.train()
    finally:
        trainer.close()

    rows_m, rows_s = read_jsonl(os.path.join(multi, "metrics.jsonl")), read_jsonl(os.path.join(single, "metrics.jsonl"))
    assert [r["step"] for r in rows_m] == [1, 2, 3]
    assert rows_s[0]["reward_std"] > 0  # the comparison is about runs that learn
    for rm, rs in zip(rows_m, rows_s):
        for key in ("loss", "policy_loss", "entropy", "reward_mean", "grad_norm"):
            assert rm[key] == pytest.approx(rs[key], abs=1e-5), (rm["step"], key)
        # each process read only the prompts of its devices' rows (half of the step's 4)
        assert (rs["prompts_read"], rm["prompts_read"]) == (4, 2)
    weights = _weights(multi)
    _close(weights, _weights(single))

    # resume: drop the last checkpoint and let 2 processes redo step 3 from the step-2 checkpoint
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(multi, "checkpoints"), os.path.join(resumed, "checkpoints"))
    shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
    _launch(_overrides(tiny_model_dir, resumed))
    rows_r = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert [r["step"] for r in rows_r] == [3]
    for key in ("loss", "policy_loss", "entropy", "reward_mean", "grad_norm"):
        assert rows_r[0][key] == rows_m[2][key], key
    _close(_weights(resumed), weights, tol=0.0)


def test_unreachable_coordinator_fails_with_a_clear_error(tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAXRL_COORDINATOR="127.0.0.1:1", JAXRL_NUM_PROCESSES="2", JAXRL_PROCESS_ID="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxrl_llm.cli", "train",
           "--init-timeout", "5", "--config", os.path.join(REPO, "configs", "grpo.yaml"),
           *_overrides(tiny_model_dir, str(tmp_path))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "could not join the distributed run" in proc.stderr


def test_a_preemption_notice_to_one_process_stops_all_at_the_same_saved_step(tiny_model_dir, tmp_path):
    # SIGTERM is how TPU and cluster schedulers announce an eviction; JAX's preemption service carries the notice
    # to every process, and all save the same step and exit with 75
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    overrides = _overrides(tiny_model_dir, tmp_path, steps=200)
    procs = []
    for rank in range(2):
        penv = dict(env, JAXRL_COORDINATOR=f"127.0.0.1:{port}", JAXRL_NUM_PROCESSES="2", JAXRL_PROCESS_ID=str(rank),
                    JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxrl_llm.cli", "train", "--config",
                                       os.path.join(REPO, "configs", "grpo.yaml"), *overrides], env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # not process 0: the notice must reach the others
        errs = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    steps = [r["step"] for r in read_jsonl(metrics)]
    for p, err in zip(procs, errs):
        assert p.returncode == 75, err[-3000:]
        assert f"preemption notice: checkpoint of step {steps[-1]} saved" in err.splitlines()[-1]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 200
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())[-1] == steps[-1]
