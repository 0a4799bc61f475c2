"""reasoning-gym as a prompt source: deterministic rows, its verifier as the reward, and an RL step on it."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("reasoning_gym")  # the `gym` extra; the README's test command installs it

from jaxrl_llm.data import load_rows  # noqa: E402
from jaxrl_llm.config import load_config  # noqa: E402
from jaxrl_llm.rewards import get_reward  # noqa: E402
from jaxrl_llm.tasks.gym import GymTask, extract_final  # noqa: E402


def _python_value(question: str) -> int:
    # independent evaluator: basic_arithmetic asks "Calculate <expression>." with integer operands
    expr = question.split("Calculate", 1)[1].split("\n")[0].strip().rstrip(".").replace("×", "*").replace("÷", "/")
    value = eval(expr, {"__builtins__": {}})  # noqa: S307 - the generated expression is plain arithmetic
    assert float(value).is_integer(), expr
    return int(value)


def test_rows_are_deterministic_and_answers_check_independently():
    kwargs = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1, operators=("+", "-", "*"))
    rows = GymTask("basic_arithmetic", seed=3, size=20, **kwargs).rows()
    assert rows == GymTask("basic_arithmetic", seed=3, size=20, **kwargs).rows()
    assert rows != GymTask("basic_arithmetic", seed=4, size=20, **kwargs).rows()
    for row in rows:
        assert row["prompt"].endswith("Give the final answer after '#'.")
        assert int(row["answer"]) == _python_value(row["prompt"])


def test_gym_reward_uses_the_gym_verifier():
    rows = GymTask("basic_arithmetic", seed=0, size=6, max_digits=1, operators=("+", "-")).rows()
    reward = get_reward("gym")
    right = [f"work...#{r['answer']}" for r in rows]
    wrong = [f"#{int(r['answer']) + 1}" for r in rows]
    entries = [r["gym_entry"] for r in rows]
    assert reward([r["prompt"] for r in rows], right, gym_entry=entries) == [1.0] * 6
    assert max(reward([r["prompt"] for r in rows], wrong, gym_entry=entries)) < 1.0
    assert extract_final("a#1, then #  42 ") == "42" and extract_final("no marker ") == "no marker"


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="reasoning-gym dataset 'no_such_task'"):
        GymTask("no_such_task", size=2)


def test_rl_trainer_runs_on_a_gym_source(tmp_path):
    from flax import nnx

    from jaxrl_llm.models import Decoder, ModelConfig, save_hf
    from jaxrl_llm.tokenizer import build_char_tokenizer
    from jaxrl_llm.trainer.rl import RLTrainer
    from jaxrl_llm.tracking import read_jsonl

    tok = build_char_tokenizer()
    model_dir = str(tmp_path / "model")
    cfg = ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), model_dir, tokenizer=tok)
    overrides = [f"model.path={model_dir}", f"log.run_dir={tmp_path / 'run'}", "data.source=gym",
                 "data.task=basic_arithmetic", "data.task_kwargs={size: 16, max_digits: 1, operators: ['+', '-']}",
                 "data.max_prompt_tokens=160", "reward.fns=[{name: gym}]", "train.steps=1",
                 "train.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6", "train.micro_batch_size=8",
                 "log.tensorboard=false", "log.progress=false", "checkpoint.export_hf=false",
                 "checkpoint.async_save=false"]
    run = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "grpo.yaml"), overrides)
    assert len(load_rows(run.data)) == 16
    trainer = RLTrainer(run)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
    assert np.isfinite(metrics["loss"])
    rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert rows[-1]["step"] == 1 and rows[-1]["reward_errors"] == 0.0
    assert json.loads(load_rows(run.data)[0]["gym_entry"])["name"] == "basic_arithmetic"
