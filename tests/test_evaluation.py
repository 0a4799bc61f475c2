"""Evaluation during training: its numbers against an independent count, its steps, the best checkpoint, and runs
whose model, data and run directory are URIs (memory://, file://), resumed."""
import json
import math
import os

import fsspec
import jax
import numpy as np
import pytest
from test_trainer_rl import _cfg as _trainer_cfg

from jaxrl_llm import paths
from jaxrl_llm.config import ConfigError, load_config
from jaxrl_llm.data import PromptEncoder, PromptRows, ListSource
from jaxrl_llm.models import load_hf
from jaxrl_llm.parallel import Layout, make_mesh
from jaxrl_llm.rewards import get_reward, register_reward
from jaxrl_llm.sampling import Sampler, SamplingParams
from jaxrl_llm.tokenizer import load_tokenizer
from jaxrl_llm.tracking import read_jsonl
from jaxrl_llm.trainer.evaluation import Evaluator
from jaxrl_llm.trainer.rl import RLTrainer

SEEN = []


@register_reward("even_length_for_test", factory=False)
def _even_length(prompts, completions, **_):
    scores = [float(len(c) % 2 == 0) for c in completions]
    SEEN.append(scores)
    return scores


_even_length.batched = True  # called with whole batches (not one item at a time), so the test sees them


def _pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_eval_metrics_match_an_independent_count(tiny_model_dir):
    mesh = make_mesh({"data": -1}, jax.devices())
    model, _ = load_hf(tiny_model_dir, mesh=mesh)
    tok = load_tokenizer(tiny_model_dir)
    rows = PromptRows(ListSource([{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]))
    encoder = PromptEncoder(tok, max_tokens=8)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=4, stop_tokens=(tok.eos_token_id,))
    from flax import nnx

    evaluator = Evaluator(rows, encoder, sampler=Sampler(model), sampling=sampling,
                          reward_fns=[("even_length_for_test", get_reward("even_length_for_test"), 1.0)],
                          layout=Layout(mesh),
                          tokenizer=tok, every=2, at_start=False, last_step=5, batch_prompts=4, max_prompts=None,
                          seed=0, reward_timeout=10.0)
    assert [s for s in range(6) if evaluator.due(s)] == [2, 4, 5]
    assert evaluator.maybe_run(3, nnx.state(model)) == {}
    SEEN.clear()
    metrics = evaluator.run(2, nnx.state(model))
    # batch 1: prompts 0-3, batch 2: prompt 4 and three padding copies whose rows are dropped
    assert [len(s) for s in SEEN] == [16, 16]
    scores = np.array(SEEN[0] + SEEN[1][:4]).reshape(5, 4)
    correct = scores.sum(1).astype(int)
    for k in (1, 2, 4):
        expected = np.mean([_pass_at_k(4, int(c), k) for c in correct])
        assert metrics[f"eval/pass@{k}"] == pytest.approx(expected, abs=1e-12), k
    assert metrics["eval/reward_mean"] == pytest.approx(scores.mean())
    assert metrics["eval/reward/even_length_for_test"] == pytest.approx(scores.mean())
    assert metrics["eval/prompts"] == 5.0
    # the same step samples the same completions
    SEEN.clear()
    assert evaluator.run(2, nnx.state(model))["eval/pass@1"] == metrics["eval/pass@1"]
    assert SEEN[0] + SEEN[1][:4] == list(scores.reshape(-1))


def _cfg(model, run_dir, *extra):
    return load_config(None, [
        f"model.path={model}", f"log.run_dir={run_dir}", "train.steps=4", "train.prompts_per_step=4", "rollout.n=4",
        "rollout.max_new_tokens=8", "train.micro_batch_size=8", "data.task_kwargs={num_problems: 64, max_ops: 2}",
        "train.lr=1e-3", "log.tensorboard=false", "log.progress=false", "checkpoint.async_save=false",
        "eval.n=4", "eval.batch_prompts=4", "eval.max_new_tokens=8", *extra])


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.learner.params)]


def _training_keys(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time", "eval/time")) and k not in (
        "tokens_per_sec", "model_tflops_per_sec", "mfu")} for r in rows]


@pytest.mark.slow
def test_resumed_from_a_uri_run_dir_with_evaluation_and_best_checkpoint(tiny_model_dir, tmp_path):
    """file:// run directories (read and written through fsspec like gs://; orbax gets the local path): a run
    interrupted after 2 steps and resumed equals the straight one, evaluations included; evaluating changes
    nothing in the training."""
    # test_trainer_rl._cfg's settings: its training programs are the ones the other trainer tests compile
    ev = ["eval.split=8", "eval.every=2", "checkpoint.best_metric=eval/pass@1", "checkpoint.every=1", "eval.n=4",
          "eval.batch_prompts=4"]

    def cfg(run_dir, *extra):
        return _trainer_cfg(tiny_model_dir, run_dir, None, *extra)

    straight = RLTrainer(cfg(f"file://{tmp_path}/a", *ev))
    straight.train()
    straight.close()
    first = RLTrainer(cfg(f"file://{tmp_path}/b", *ev))
    first.train(stop_after=2)
    first.close()
    resumed = RLTrainer(cfg(f"file://{tmp_path}/b", *ev))
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    quiet = RLTrainer(cfg(str(tmp_path / "c"), "eval.split=8", "checkpoint.export_hf=false"))
    quiet.train()
    quiet.close()
    for x, y, z in zip(_params(straight), _params(resumed), _params(quiet)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    a = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    b = read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
    assert _training_keys(a) == _training_keys(b)
    assert [r["step"] for r in a if "eval/pass@1" in r] == [2, 4]
    assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/reward_mean", "eval/reward/task"} <= set(a[1])
    assert not any(k.startswith("eval/") for r in read_jsonl(str(tmp_path / "c" / "metrics.jsonl")) for k in r)
    # the best evaluated step is kept beside the newest ones
    best = 2 if a[1]["eval/pass@1"] > a[3]["eval/pass@1"] else 4  # a tie goes to the later step
    assert straight.checkpointer.best_step() == best
    assert best in straight.checkpointer.all_steps()
    assert os.path.exists(tmp_path / "a" / "hf" / "model.safetensors")
    assert os.path.exists(tmp_path / "a" / "config.yaml")


def test_model_data_and_run_dir_on_an_in_memory_filesystem(tiny_model_dir, tmp_path):
    """Everything through memory:// URIs (checkpoints, which orbax writes only to local paths and gs://, in
    checkpoint.dir): the model is copied to the local cache, the data read by index, the run files written."""
    root = "memory://bucket"
    paths.rmtree(root)
    for name in os.listdir(tiny_model_dir):
        with open(os.path.join(tiny_model_dir, name), "rb") as f:
            paths.write_bytes(paths.join(root, "model", name), f.read())
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)} for i in range(40)]
    with fsspec.open(f"{root}/data/train.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(f"{root}/model", f"{root}/run", "train.steps=2", "data.source=jsonl", f"data.path={root}/data/",
               "data.chat_template=true", "data.system_prompt=add", "eval.split=4", "eval.every=1",
               f"model.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={tmp_path / 'ckpt'}")
    trainer = RLTrainer(cfg)
    try:
        # the derived prompt length: the longest conversation as the template renders it, rounded up to 16
        tok = load_tokenizer(tiny_model_dir)
        longest = max(len(tok(tok.apply_chat_template([{"role": "system", "content": "add"}] + r["messages"],
                                                      tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]) for r in rows)
        assert trainer.prompts.scan.longest == longest
        assert trainer.prompts.encoder.max_tokens == -(-longest // 16) * 16
        trainer.train()
    finally:
        trainer.close()
    rows_logged = read_jsonl(f"{root}/run/metrics.jsonl")
    assert [r["step"] for r in rows_logged] == [1, 2] and all("eval/pass@1" in r for r in rows_logged)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(paths.listdir(f"{root}/run/hf"))
    assert paths.exists(f"{root}/run/config.yaml") and sorted(os.listdir(tmp_path / "ckpt")) == ["2"]
    from jaxrl_llm.report import report_run_dir

    summary = report_run_dir(f"{root}/run")
    assert summary == f"{root}/run/report/summary.md"
    text = paths.read_text(summary)
    assert "## Held-out evaluation" in text and "| eval/pass@1 |" in text
    assert {"curve_eval.png", "passk_vs_k.png", "curve_reward.png"} <= set(paths.listdir(f"{root}/run/report"))
    with pytest.raises(ValueError, match="checkpoint.dir: orbax writes checkpoints"):
        RLTrainer(_cfg(f"{root}/model", f"{root}/run2", "train.steps=1", f"model.cache_dir={tmp_path / 'cache'}"))


def test_eval_config_errors():
    with pytest.raises(ConfigError, match="eval.data.source: evaluation needs one held-out set"):
        load_config(None, ["model.path=x", "eval.every=5"])
    with pytest.raises(ConfigError, match="eval.data.source: evaluation needs one held-out set"):
        load_config(None, ["model.path=x", "eval.every=5", "eval.split=0.1", "eval.data.source=task"])
    with pytest.raises(ConfigError, match="eval.split: must be a fraction"):
        load_config(None, ["model.path=x", "eval.every=5", "eval.split=2.5"])
    with pytest.raises(ConfigError, match="checkpoint.best_metric: must be an evaluation metric"):
        load_config(None, ["model.path=x", "eval.every=5", "eval.split=0.1", "checkpoint.best_metric=reward_mean"])
    with pytest.raises(ConfigError, match="checkpoint.best_metric: ranks evaluations: needs eval.every > 0"):
        load_config(None, ["model.path=x", "checkpoint.best_metric=eval/pass@1"])
    with pytest.raises(ConfigError, match="eval.data.path: needed for eval.data.source=jsonl"):
        load_config(None, ["model.path=x", "eval.every=5", "eval.data.source=jsonl"])
    cfg = load_config(None, ["model.path=x", "eval.every=5", "eval.data.source=task"])
    assert cfg.eval.data.shuffle is False
