"""User errors end the command with one line naming the key, file or value and exit code 2 (``--debug`` shows the
traceback); the pipeline checks every stage's config before its first stage; a diverging run exits 3."""
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.cli import main
from jaxrl_llm.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY = ["train.steps=1", "train.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=12",
        "train.micro_batch_size=8", "data.max_prompt_tokens=40", "data.task_kwargs={num_problems: 64, max_ops: 2}",
        "log.tensorboard=false", "log.progress=false", "checkpoint.async_save=false"]


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "jaxrl_llm.cli", *args], env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_args(model_dir, run_dir, *extra):
    return ["train", "--config", os.path.join(CONFIGS, "grpo.yaml"), f"model.path={model_dir}",
            f"log.run_dir={run_dir}", *TINY, *extra]


def _one_line_error(code, err, *fragments, case=""):
    assert code == 2, (case, code, err[-3000:])
    assert "Traceback" not in err, (case, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, (case, err[-3000:])
    for fragment in fragments:
        assert fragment in lines[0], (case, fragment, lines[0])
    return lines[0]


def test_user_errors_give_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # a checkpoint of something else (a different state) in a run directory
    with Checkpointer(tmp_path / "other" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, {"w": jnp.zeros(3)}, {})
    cases = {  # command line -> fragments of the expected line
        "override": (_train_args(tiny_model_dir, tmp_path / "r", "train.lr=[1e-5"), ["'train.lr=[1e-5'"]),
        "mesh": (_train_args(tiny_model_dir, tmp_path / "r", "mesh.data=64"), ["mesh", "8 available devices"]),
        "data": (_train_args(tiny_model_dir, tmp_path / "r", "data.source=jsonl", "data.path=/no/such.jsonl"),
                 ["data.path=/no/such.jsonl", "not found"]),
        "model": (_train_args("/no/such/model", tmp_path / "r"), ["model.path=/no/such/model"]),
        "run dir": (_train_args(tiny_model_dir, a_file), [f"log.run_dir={a_file}", "is a file"]),
        "resume=false": (_train_args(tiny_model_dir, tmp_path / "other", "checkpoint.resume=false"),
                         ["already holds checkpoints (latest: step 3)", "checkpoint.overwrite=true"]),
        "foreign checkpoint": (_train_args(tiny_model_dir, tmp_path / "other"),
                               ["cannot restore step 3", "checkpoint.overwrite=true"]),
        "unknown key": (_train_args(tiny_model_dir, tmp_path / "r", "train.lrr=1"), ["'train.lrr'", "train.lr"]),
        "too long": (_train_args(tiny_model_dir, tmp_path / "r", "rollout.max_new_tokens=4096"),
                     ["rollout.max_new_tokens=4096", "exceeds the model's max_position_embeddings 128"]),
        "pipeline key": (["pipeline", f"run_dir={tmp_path / 'p'}", "sft.stepz=3"],
                         ["unknown pipeline key 'sft.stepz'", "sft.steps"]),
        "pipeline preset": (["pipeline", f"run_dir={tmp_path / 'p'}", "rl.preset=grpoo"],
                            ["rl.preset", "'grpoo'", "grpo"]),
        "pipeline rl override": (["pipeline", f"run_dir={tmp_path / 'p'}", "rl.overrides=[train.micro_batch_size=7]"],
                                 ["RL stage", "train.micro_batch_size"]),
        "pipeline bad value": (["pipeline", f"run_dir={tmp_path / 'p'}", "sft.steps=many"], ["sft.steps"]),
    }
    # the command's own entry point, in this process (a new interpreter per case would cost seconds each);
    # the one subprocess below checks what the shell sees
    for name, (args, fragments) in cases.items():
        code = main(args)
        _one_line_error(code, capsys.readouterr().err, *fragments, case=name)
    # the pipeline stopped before its first stage: nothing was trained or written
    assert not os.path.exists(tmp_path / "p" / "sft")
    proc = _start(*cases["mesh"][0])
    _, err = proc.communicate(timeout=600)
    _one_line_error(proc.returncode, err, *cases["mesh"][1])
    debug = _start("--debug", *cases["mesh"][0])
    _, err = debug.communicate(timeout=600)
    assert debug.returncode != 0 and "Traceback" in err and "ConfigError: mesh" in err


def test_an_exploding_learning_rate_exits_3_without_an_export(tiny_model_dir, tmp_path, capsys):
    code = main(_train_args(tiny_model_dir, tmp_path, "train.lr=1e30", "train.steps=3", "checkpoint.every=1",
                            'reward.fns=[{name: format, kwargs: {pattern: "[0-9]"}}]'))
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "training diverged at step 1" in err.splitlines()[-1] and "Traceback" not in err
    assert not os.path.exists(tmp_path / "hf")
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == []


def test_pipeline_config_errors_name_the_key(tmp_path):
    from jaxrl_llm.pipeline import check_pipeline, load_pipeline_config

    with pytest.raises(ConfigError, match=r"unknown pipeline key 'rl.prest'.*did you mean rl.preset"):
        load_pipeline_config(os.path.join(CONFIGS, "main.yaml"), ["rl.prest=dapo"])
    with pytest.raises(ConfigError, match="cannot parse the value of override 'seed=\\[1'"):
        load_pipeline_config(None, ["seed=[1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  stepps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown pipeline key 'sft.stepps' in .*bad.yaml"):
        load_pipeline_config(str(bad), [])
    for override, key in (("redo=rll", "redo"), ("rl.edge_low=0.9", "rl.edge_low"),
                          ("eval.difficulties=[0]", "eval.difficulties"),
                          ("rl.overrides=[algorithm.policy_loss=ppo]", "algorithm.policy_loss")):
        cfg = load_pipeline_config(os.path.join(CONFIGS, "main.yaml"), [f"run_dir={tmp_path / 'p'}", override])
        with pytest.raises(ConfigError, match=key):
            check_pipeline(cfg, CONFIGS)
    cfg = load_pipeline_config(os.path.join(CONFIGS, "main.yaml"), [f"run_dir={tmp_path / 'p'}"])
    rl_cfg = check_pipeline(cfg, CONFIGS)  # the main job's own settings pass
    assert rl_cfg.train.steps == 40 and rl_cfg.checkpoint.every > 0
