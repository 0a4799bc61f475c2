"""The main job's stages on tiny settings: SFT lowers the loss; the whole pipeline writes its report."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import Decoder, ModelConfig, load_hf
from jaxrl_llm.sft import run_sft
from jaxrl_llm.tasks import ArithTask
from jaxrl_llm.tokenizer import build_char_tokenizer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_short_sft_lowers_loss_and_saves_a_loadable_policy(tmp_path):
    tok = build_char_tokenizer()
    cfg = ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                      max_position_embeddings=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    examples = ((p.model_input, p.solution) for p in ArithTask(1, 2).stream("train", 0))
    losses = run_sft(model, tok, examples, steps=40, batch_size=16, prompt_len=24, target_len=24, lr=3e-3,
                     out_dir=str(tmp_path / "sft"), progress=False, log_every=1)
    # a uniform guess over the vocabulary costs ln(V); the character grammar alone is learnt in a few dozen steps
    assert abs(losses[0] - np.log(len(tok))) < 0.5
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    loaded, _ = load_hf(str(tmp_path / "sft"))
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


@pytest.mark.slow
def test_pipeline_writes_the_report_and_a_rerun_recomputes_only_what_changed(tmp_path):
    from jaxrl_llm.pipeline import load_pipeline_config, run_pipeline
    from jaxrl_llm.tracking import read_jsonl

    def cfg(steps, *extra):
        return load_pipeline_config(os.path.join(CONFIGS, "main.yaml"), [
            f"run_dir={tmp_path}", "model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
            "sft.steps=5", "sft.batch_size=8", "sft.difficulties=[1,2]", "eval.difficulties=[1,2]",
            "eval.problems=4", "eval.n=4", f"rl.overrides=[train.steps={steps},train.prompts_per_step=4,rollout.n=4,"
            "train.micro_batch_size=8,log.progress=false]", *extra])

    def stamps():
        files = ["sft/model.safetensors", "eval_sft.json", "rl/hf/model.safetensors", "eval_rl.json"]
        return {f: os.stat(tmp_path / f).st_mtime_ns for f in files}

    def steps():
        return [r["step"] for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl")]

    path = run_pipeline(cfg(2), CONFIGS)
    report = os.path.dirname(path)
    assert len([f for f in os.listdir(report) if f.endswith(".png")]) >= 8
    for name in ("eval_sft.json", "eval_rl.json"):
        table = json.load(open(tmp_path / name))
        assert set(table) == {"1", "2"} and all(0.0 <= r["pass@1"] <= r["pass@4"] <= 1.0 for r in table.values())
    assert os.path.isfile(tmp_path / "sft" / "config.json") and os.path.isfile(tmp_path / "rl" / "hf" / "config.json")
    assert "| pass@1 |" in open(path).read()

    first = stamps()
    run_pipeline(cfg(2), CONFIGS)  # the same job again: every stage reused, nothing rewritten
    assert stamps() == first and steps() == [1, 2]
    run_pipeline(cfg(3), CONFIGS)  # other RL settings: SFT and its evaluation reused, RL and later recomputed
    again = stamps()
    assert again["sft/model.safetensors"] == first["sft/model.safetensors"]
    assert again["eval_sft.json"] == first["eval_sft.json"]
    assert again["rl/hf/model.safetensors"] != first["rl/hf/model.safetensors"]
    assert steps() == [1, 2, 3]  # started afresh: no rows of the earlier RL run
    run_pipeline(cfg(3, "redo=eval_rl"), CONFIGS)
    last = stamps()
    assert last["eval_rl.json"] != again["eval_rl.json"] and last["rl/hf/model.safetensors"] == again[
        "rl/hf/model.safetensors"]
