"""Configuration: merge order, typed overrides, errors that name the key."""
import os

import pytest

from jaxrl_llm.config import ConfigError, load_config, save_config, validate


def test_merge_order_and_types(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  path: /m\ntrain:\n  steps: 5\n  lr: 0.001\nalgorithm:\n  clip_high: 0.28\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  steps: 7\nrollout:\n  n: 4\n")
    cfg = load_config(str(child), ["train.lr=3e-4", "algorithm.dual_clip=3", "rollout.sampler_dtype=null"])
    assert cfg.model.path == "/m" and cfg.train.steps == 7 and cfg.rollout.n == 4
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.algorithm.clip_high == pytest.approx(0.28)
    assert cfg.algorithm.dual_clip == 3.0 and cfg.rollout.sampler_dtype is None
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.step=3"], "unknown config key 'train.step'.*train.steps"),
    (["train.steps=abc"], "invalid value for 'train.steps'"),
    (["algorithm.minibatches=3"], "algorithm.minibatches: 64 responses"),
    (["train.micro_batch_size=5"], "train.micro_batch_size"),
    (["algorithm.policy_loss=ppo"], "algorithm.policy_loss: got 'ppo'; allowed: ppo_clip"),
    (["algorithm.clip_low=1.5"], "algorithm.clip_low"),
    (["algorithm.dual_clip=0.5"], "algorithm.dual_clip"),
    (["algorithm.loss_agg=mean"], "algorithm.loss_agg"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["rollout.consistency=exact", "rollout.sampler_dtype=bfloat16"], "rollout.sampler_dtype"),
    (["rollout.compact_rows=-1"], "rollout.compact_rows: must be >= 0"),
    (["rollout.consistency=exact", "algorithm.dynamic_sampling=true", "rollout.compact_rows=8"],
     "rollout.compact_rows: exact consistency with algorithm.dynamic_sampling"),
    (["data.source=jsonl"], "data.path"),
    (["train.steps"], "section.key=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=/m"] + overrides)


def test_missing_required_and_mesh_check(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, [])
    cfg = load_config(None, ["model.path=/m", "mesh.tensor=3"])
    with pytest.raises(ConfigError, match="mesh"):
        validate(cfg, device_count=8)
    cfg = load_config(None, ["model.path=/m", "train.micro_batch_size=4", "mesh.data=8"])
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        validate(cfg, device_count=8)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_keeps_compiled_programs_on_disk(tmp_path, monkeypatch):
    import subprocess
    import sys

    from jaxrl_llm import cli

    for var in ("JAX_COMPILATION_CACHE_DIR", "JAXRL_COMPILATION_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    cli._compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "home" / "jaxrl_llm" / "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")  # set by the user: kept
    cli._compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("JAXRL_COMPILATION_CACHE", "off")
    cli._compilation_cache()
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    # a command's process writes what it compiles into the chosen directory
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAXRL_COMPILATION_CACHE=str(tmp_path / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    code = ("from jaxrl_llm import cli; cli._compilation_cache(); import jax, jax.numpy as jnp; "
            "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert any((tmp_path / "xla").iterdir())


def test_config_names_are_the_libraries_names():
    # the config lists its choices so that reading a config needs no JAX; they must be the libraries' own
    from jaxrl_llm import advantages as A
    from jaxrl_llm import config as C
    from jaxrl_llm import losses as L
    from jaxrl_llm.losses import correction
    from jaxrl_llm.models.remat import REMAT_SETTINGS
    from jaxrl_llm.parallel import DEFAULT_RULES, MESH_AXES
    from jaxrl_llm.rewards import REWARDS
    from jaxrl_llm.sampling import Sampler
    from jaxrl_llm.trainer.optim import SCHEDULES
    from jaxrl_llm.trainer.rl import DTYPES

    assert set(C.POLICY_LOSSES) == set(L.POLICY_LOSSES)
    assert set(C.AGG_MODES) == set(L.AGG_MODES) and set(C.KL_ESTIMATORS) == set(L.KL_ESTIMATORS)
    assert set(C.ADVANTAGES) == set(A.ESTIMATORS)
    assert set(C.GROUP_ADVANTAGES) == {k for k, e in A.ESTIMATORS.items() if e.kind == "group"}
    assert set(C.ROLLOUT_IS) == set(correction.IS_LEVELS) and set(C.ROLLOUT_MASK) == set(correction.MASK_LEVELS)
    assert set(C.REMAT) == set(REMAT_SETTINGS) and set(C.SCHEDULES) == set(SCHEDULES)
    assert set(C.CONSISTENCY) == set(Sampler.CONSISTENCY_MODES) and set(C.DTYPES) == set(DTYPES)
    assert set(C.LOGICAL_AXES) == set(DEFAULT_RULES) and C.MESH_AXES == MESH_AXES
    assert "task" in REWARDS


def test_mesh_rules_override_the_default_table(tiny_model_dir, tmp_path):
    from jaxrl_llm.parallel import merge_rules

    base = [f"model.path={tiny_model_dir}", f"log.run_dir={tmp_path}"]
    cfg = load_config(None, base + ["mesh.rules={batch: [data], mlp: [fsdp, tensor]}"])
    rules = merge_rules(cfg.mesh.rules)
    assert rules["batch"] == ("data",) and rules["mlp"] == ("fsdp", "tensor") and rules["embed"] == "fsdp"
    with pytest.raises(ConfigError, match="mesh.rules: got 'batches'"):
        load_config(None, base + ["mesh.rules={batches: [data]}"])
    with pytest.raises(ConfigError, match="mesh.rules.batch: got 'dp'"):
        load_config(None, base + ["mesh.rules={batch: [dp]}"])
