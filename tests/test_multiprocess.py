"""Multi-process training: 2 processes x 4 CPU devices (collectives over loopback) stopped by a preemption notice and
resumed, against 1 process x 8 devices. The resume runs `launch/multiprocess_cpu.sh`, the same path as a cluster
launch."""
import glob
import os
import signal
import socket
import subprocess
import sys
import time

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


def _launcher_env():
    """This environment without the test process's device settings: each launched process sets its own."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _launch(overrides, nproc=2, devices=4):
    env = _launcher_env()
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


def _preempted(overrides, run_dir):
    """2 processes x 4 devices started as a cluster would, and told to stop by a SIGTERM to process 1 once a step is
    done; returns the processes' stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _launcher_env()
    procs = []
    for rank in range(2):
        penv = dict(env, JAXRL_COORDINATOR=f"127.0.0.1:{port}", JAXRL_NUM_PROCESSES="2", JAXRL_PROCESS_ID=str(rank),
                    JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxrl_llm.cli", "train", "--config",
                                       os.path.join(REPO, "configs", "grpo.yaml"), *overrides], env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics = run_dir / "metrics.jsonl"
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
    for p, err in zip(procs, errs):
        assert p.returncode == 75, err[-3000:]
    return errs


def test_two_processes_stop_together_resume_and_match_one(tiny_model_dir, tmp_path):
    # SIGTERM is how TPU and cluster schedulers announce an eviction; JAX's preemption service carries the notice
    # to every process, and all save the same step k and exit with 75. The same command with train.steps=k+1 then
    # resumes for one more step. Every step and the final weights must equal one process with 8 devices running
    # k+1 steps (the learning rate is constant: train.steps changes no step before the last)
    multi = tmp_path / "multi"
    errs = _preempted(_overrides(tiny_model_dir, multi, steps=200), multi)
    steps = [r["step"] for r in read_jsonl(multi / "metrics.jsonl")]
    k = steps[-1]
    for err in errs:
        assert f"preemption notice: checkpoint of step {k} saved" in err.splitlines()[-1]
    assert steps == list(range(1, k + 1)) and k < 200
    assert sorted(int(d) for d in os.listdir(multi / "checkpoints") if d.isdigit())[-1] == k

    out = _launch(_overrides(tiny_model_dir, multi, steps=k + 1))
    assert out.stdout.count('"loss"') == 1  # only process 0 prints the final metrics

    single = str(tmp_path / "single")
    with RLTrainer(load_config(os.path.join(REPO, "configs", "grpo.yaml"),
                               _overrides(tiny_model_dir, single, steps=k + 1))) as trainer:
        trainer.train()

    rows_m, rows_s = read_jsonl(multi / "metrics.jsonl"), read_jsonl(os.path.join(single, "metrics.jsonl"))
    assert [r["step"] for r in rows_m] == [r["step"] for r in rows_s] == list(range(1, k + 2))
    assert rows_s[0]["reward_std"] > 0  # the comparison is about runs that learn
    for rm, rs in zip(rows_m, rows_s):
        for key in ("loss", "policy_loss", "entropy", "reward_mean", "grad_norm"):
            assert rm[key] == pytest.approx(rs[key], abs=1e-5), (rm["step"], key)
        # each process read only the prompts of its devices' rows (half of the step's 4)
        assert (rs["prompts_read"], rm["prompts_read"]) == (4, 2)
    _close(_weights(multi), _weights(single))


def test_unreachable_coordinator_fails_with_a_clear_error(tiny_model_dir, tmp_path):
    env = _launcher_env()
    env.update(JAXRL_COORDINATOR="127.0.0.1:1", JAXRL_NUM_PROCESSES="2", JAXRL_PROCESS_ID="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxrl_llm.cli", "train",
           "--init-timeout", "5", "--config", os.path.join(REPO, "configs", "grpo.yaml"),
           *_overrides(tiny_model_dir, str(tmp_path))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "could not join the distributed run" in proc.stderr
