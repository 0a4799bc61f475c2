"""The RL trainer end to end on a tiny model: presets, exact resume, sharded == unsharded, bad input."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.config import ConfigError, load_config
from jaxrl_llm.hardware import peak_tflops
from jaxrl_llm.tokenizer import build_char_tokenizer
from jaxrl_llm.trainer.rl import RLTrainer
from jaxrl_llm.tracking import read_jsonl

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _overrides(model_dir, run_dir) -> list[str]:
    """The shared tiny run's settings (as command-line overrides): tests that keep them share compiled programs."""
    return [f"model.path={model_dir}", f"log.run_dir={run_dir}", "train.steps=4", "train.prompts_per_step=4",
            "rollout.n=4", "rollout.max_new_tokens=12", "train.micro_batch_size=8", "data.max_prompt_tokens=40",
            "data.task_kwargs={num_problems: 64, max_ops: 2}", "train.lr=1e-3", "log.tensorboard=false",
            "log.progress=false", "checkpoint.async_save=false", "algorithm.overlong_cache=4"]


def _cfg(model_dir, run_dir, preset=None, *extra):
    path = os.path.join(CONFIGS, f"{preset}.yaml") if preset else None
    return load_config(path, [*_overrides(model_dir, run_dir), *extra])


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.learner.params)]


@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo", "drgrpo", "justrl", "ppo"])
def test_every_preset_runs(preset, tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, preset, "train.steps=2", "checkpoint.export_hf=false")
    trainer = RLTrainer(cfg)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
    assert metrics["skipped_nonfinite"] == 0.0 and np.isfinite(metrics["loss"])
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "pass@1", "pass@4", "entropy", "clip_frac_high", "train_sampler_abs_max", "grad_norm",
                "tokens_per_sec", "time_rollout_reward", "time_update", "response_length_mean"):
        assert key in rows[-1], key
    if preset == "dapo":
        assert "dynamic_fill_rate" in rows[-1]
    if preset == "grpo":  # no MFU on CPU (no known peak) ...
        assert "mfu" not in rows[-1]
    if preset == "ppo":
        for key in ("kl_ref", "value_loss", "value_clip_frac", "explained_variance", "value_grad_norm"):
            assert key in rows[-1], key
        assert np.isfinite(rows[-1]["value_loss"])


def test_peak_tflops_for_mfu(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="log.peak_tflops"):
        _cfg(tiny_model_dir, tmp_path, None, "log.peak_tflops=0")
    # data-sheet bf16 peaks by jax device_kind
    assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5") == 459.0
    assert peak_tflops("TPU v6 lite") == 918.0 and peak_tflops("TPU v4") == 275.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("cpu") is None


def test_reinforce_pp_with_kl_in_reward_runs(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, None, "train.steps=1", "algorithm.advantage=reinforce_pp",
               "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true", "checkpoint.export_hf=false")
    trainer = RLTrainer(cfg)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
    assert np.isfinite(metrics["loss"]) and "kl_ref" in metrics


@pytest.mark.parametrize("preset", [None, "ppo"])  # ppo: the critic and its optimizer state resume too
def test_exact_resume_and_export(preset, tiny_model_dir, tmp_path):
    straight = RLTrainer(_cfg(tiny_model_dir, tmp_path / "a", preset))
    straight.train()
    straight.close()

    first = RLTrainer(_cfg(tiny_model_dir, tmp_path / "b", preset, "checkpoint.every=1"))
    first.train(stop_after=2)
    first.close()
    resumed = RLTrainer(_cfg(tiny_model_dir, tmp_path / "b", preset, "checkpoint.every=1"))
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    for x, y in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(x, y)
    if preset == "ppo":
        for x, y in zip(jax.tree.leaves(straight.learner.critic.params), jax.tree.leaves(resumed.learner.critic.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def clean(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time") and k not in (
            "tokens_per_sec", "model_tflops_per_sec", "mfu")} for r in rows]

    a = clean(read_jsonl(os.path.join(tmp_path, "a", "metrics.jsonl")))
    b = clean(read_jsonl(os.path.join(tmp_path, "b", "metrics.jsonl")))
    assert a == b
    # the exported policy is a loadable Hugging Face checkpoint holding the trained weights
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, "a", "hf"))
    emb = hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(emb, np.asarray(straight.learner.params["embed"][...]), atol=0)


def test_sharded_matches_single_device(tiny_model_dir, tmp_path):
    cfg1 = _cfg(tiny_model_dir, tmp_path / "one", None, "train.steps=3", "mesh.data=1",
                "checkpoint.export_hf=false")
    single = RLTrainer(cfg1, devices=jax.devices()[:1])
    m1 = single.train()
    cfg8 = _cfg(tiny_model_dir, tmp_path / "eight", None, "train.steps=3", "mesh.data=2", "mesh.fsdp=2",
                "mesh.tensor=2", "checkpoint.export_hf=false")
    sharded = RLTrainer(cfg8)
    m8 = sharded.train()
    assert len(sharded.learner.params["layers"][0]["attn"]["q"][...].sharding.device_set) == 8
    for x, y in zip(_params(single), _params(sharded)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m8["loss"], atol=1e-5)
    single.close()
    sharded.close()


def test_mesh_rules_place_the_trainers_arrays_and_remat_trains(tiny_model_dir, tmp_path):
    from jax.sharding import PartitionSpec as P

    # rows over `data` only, `embed` dimensions replicated: the rules table from the config places every array.
    # The same run rematerialises its layers (in the update only: the sampler fills its KV cache without it) and
    # logs MFU, given the peak
    cfg = _cfg(tiny_model_dir, tmp_path, None, "train.steps=1", "checkpoint.export_hf=false", "mesh.data=2",
               "mesh.fsdp=4", "mesh.rules={batch: [data], embed: null}", "model.remat=full", "log.peak_tflops=0.5")
    with RLTrainer(cfg) as trainer:
        assert trainer.layout.rows().spec == P(("data",))
        assert trainer.learner.params["layers"][0]["mlp"]["gate"][...].sharding.spec == P(None, None)
        metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and metrics["skipped_nonfinite"] == 0.0
    # achieved model TFLOP/s over the peak of every device of the run
    assert metrics["mfu"] == pytest.approx(metrics["model_tflops_per_sec"] / (0.5 * jax.device_count()), rel=1e-6)


def test_shared_prompts_and_packing_train_like_one_forward_per_row(tiny_model_dir, tmp_path):
    # train.share_prompts runs each prompt once for its rollout.n samples, train.pack_responses also packs each
    # group's responses into fewer rows: the same training as one forward per row, with less arithmetic
    variants = {"packed": ("true", "true"), "shared": ("true", "false"), "plain": ("false", "false")}
    runs = {}
    for name, (share, pack) in variants.items():
        cfg = _cfg(tiny_model_dir, tmp_path / name, None, "train.steps=2", "checkpoint.export_hf=false",
                   "algorithm.ppo_epochs=2", f"train.share_prompts={share}", f"train.pack_responses={pack}")
        trainer = RLTrainer(cfg)
        try:
            assert trainer.learner.sharing.update_group == (4 if share == "true" else 1)
            assert trainer.learner.sharing.pack == (name == "packed")
            trainer.train()
        finally:
            trainer.close()
        runs[name] = (_params(trainer), read_jsonl(os.path.join(tmp_path / name, "metrics.jsonl")))
    for name in ("packed", "shared"):
        for x, y in zip(runs[name][0], runs["plain"][0]):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5, err_msg=name)
        for a, b in zip(runs[name][1], runs["plain"][1]):
            for key in ("loss", "reward_mean", "entropy", "train_sampler_abs_max"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")
    for extra in ("train.micro_batch_size=2", "algorithm.minibatches=2"):
        trainer = RLTrainer(_cfg(tiny_model_dir, tmp_path / "other", None, extra, "mesh.data=1",
                                 "checkpoint.export_hf=false"), devices=jax.devices()[:1])
        try:  # micro-batches smaller than a group, or minibatches of random rows: scoring still shares prompts
            sharing = trainer.learner.sharing
            assert sharing.update_group == 1 and not sharing.pack and sharing.score_group == 4, extra
        finally:
            trainer.close()


def test_bad_input(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        RLTrainer(_cfg(tiny_model_dir, tmp_path / "r", None, "data.source=jsonl", f"data.path={empty}"))
    with pytest.raises(ValueError, match="more than data.max_prompt_tokens=5"):
        trainer = RLTrainer(_cfg(tiny_model_dir, tmp_path / "s", None, "data.max_prompt_tokens=5"))
        trainer.train()

    from jaxrl_llm.rewards import register_reward

    @register_reward("wrong_length_for_test")
    def _factory():
        return lambda prompts, completions, **_: []

    trainer = RLTrainer(_cfg(tiny_model_dir, tmp_path / "t", None, "reward.fns=[{name: wrong_length_for_test}]"))
    with pytest.raises(ValueError, match="'wrong_length_for_test' returned 0 scores for 1 completions"):
        trainer.train()
    trainer.close()


def test_trimming_responses_keeps_every_sampled_token_and_its_score(tiny_model_dir):
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.sampling import Sampler, SamplingParams, score
    from jaxrl_llm.trainer.rollout import trim_responses

    model, _ = load_hf(tiny_model_dir)
    tok = build_char_tokenizer()
    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], np.int32)
    mask = ids > 0
    # a stop token sampled often, so responses end well before the budget
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=4, stop_tokens=(tok.eos_token_id, *range(20, 60)))
    ro = Sampler(model).generate(nnx.state(model), ids, mask, params, jax.random.key(3))
    cut = trim_responses(ro, multiple=8)
    longest = int(np.asarray(ro.lengths).max())
    assert cut.tokens.shape[1] == max(8, -(-longest // 8) * 8) < 40
    np.testing.assert_array_equal(np.asarray(cut.tokens), np.asarray(ro.tokens)[:, :cut.tokens.shape[1]])
    assert int(np.asarray(cut.mask).sum()) == int(np.asarray(ro.mask).sum())
    graphdef, state = nnx.split(model)
    full, _ = score(graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
    short, _ = score(graphdef, state, cut.prompt_ids, cut.prompt_mask, cut.tokens, cut.mask)
    np.testing.assert_allclose(np.asarray(short), np.asarray(full)[:, :cut.tokens.shape[1]], atol=1e-6)
    assert trim_responses(cut, multiple=8) is cut


def test_old_logp_from_the_update_matches_a_scoring_pass(tiny_model_dir, tmp_path):
    # one update per step (the grpo preset): skipping the scoring pass changes nothing but the time it took
    runs = {}
    for mode in ("auto", "score"):
        cfg = _cfg(tiny_model_dir, tmp_path / mode, "grpo", "train.steps=2", "checkpoint.export_hf=false",
                   f"algorithm.old_logp={mode}")
        trainer = RLTrainer(cfg)
        try:
            assert trainer.scorer.from_update == (mode == "auto")
            trainer.train()
        finally:
            trainer.close()
        runs[mode] = (_params(trainer), read_jsonl(os.path.join(tmp_path / mode, "metrics.jsonl")))
    for x, y in zip(runs["auto"][0], runs["score"][0]):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    for fused, scored in zip(runs["auto"][1], runs["score"][1]):
        for key in ("loss", "reward_mean", "entropy", "train_sampler_abs_mean", "train_sampler_abs_max"):
            np.testing.assert_allclose(fused[key], scored[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_old_logp_scoring_pass_is_kept_when_needed(tiny_model_dir, tmp_path):
    # exact mode needs no pass: its update computes the sampler's log-probs bit for bit, so they are the old ones
    for extra, source in (("algorithm.minibatches=2", "score"), ("algorithm.rollout_is=token", "score"),
                          ("algorithm.kl_coef=0.01", "score"), ("rollout.consistency=exact", "sampler")):
        trainer = RLTrainer(_cfg(tiny_model_dir, tmp_path, "grpo", "checkpoint.export_hf=false", extra,
                                 "train.micro_batch_size=16" if source == "sampler" else "train.micro_batch_size=8"))
        try:
            assert trainer.scorer.old_logp_source == source and not trainer.scorer.from_update, extra
        finally:
            trainer.close()


def test_scoring_passes_run_in_micro_batches(tiny_model_dir, tmp_path, monkeypatch):
    # old and reference log-probs are scored a micro-batch (train.micro_batch_size rows) at a time, never every
    # rollout row in one forward; the results are those of one forward over all rows
    import importlib

    from jaxrl_llm.sampling import score

    score_module = importlib.import_module("jaxrl_llm.sampling.score")
    program, rows_seen = score_module._jitted_score(), []

    def spy(*args, **kwargs):
        rows_seen.append(args[2].shape[0])  # prompt_ids
        return program(*args, **kwargs)

    cfg = _cfg(tiny_model_dir, tmp_path, None, "train.steps=1", "algorithm.kl_coef=0.01", "train.micro_batch_size=4",
               "mesh.data=4", "checkpoint.export_hf=false")
    with RLTrainer(cfg, devices=jax.devices()[:4]) as trainer:
        trainer.rollouts.update_weights(trainer.learner.policy_state())
        ro = trainer.rollouts.generate().rollout
        monkeypatch.setattr(score_module, "_jitted_score", lambda: spy)
        scores = trainer.scorer(trainer.learner.policy_state(), ro)
        monkeypatch.undo()
        whole, _ = score(trainer.learner.graphdef, trainer.learner.policy_state(), ro.prompt_ids, ro.prompt_mask,
                         ro.tokens, ro.mask, group=4)
    assert rows_seen == [4] * 8  # 16 rows: 4 micro-batches of old log-probs, then 4 of reference log-probs
    np.testing.assert_allclose(np.asarray(scores.old_logp), np.asarray(whole), atol=2e-6)
    np.testing.assert_allclose(np.asarray(scores.ref_logp), np.asarray(whole), atol=2e-6)


# every pair of levels of (model, dtype, devices) once: 4 runs instead of 8; one with two minibatches, which
# exact mode runs as the whole batch with the other minibatch's responses masked out (the others pack responses);
# the decode pass runs the 16 rows together however many micro-batches the gradient is taken over. With dynamic
# sampling and a reward some groups vary in, the step's rows come from two sampling rounds
TWO_ROUNDS = ("algorithm.dynamic_sampling=true", 'reward.fns=[{name: format, kwargs: {pattern: "[0-3]"}}]')
EXACT_CASES = [("dense", "float32", "mesh.data=1", 2, 4, ()), ("moe", "bfloat16", "mesh.data=1", 1, 16, TWO_ROUNDS),
               ("dense", "bfloat16", "mesh.data=2 mesh.fsdp=2 mesh.tensor=2", 1, 8, ()),
               ("moe", "float32", "mesh.data=2 mesh.expert=2 mesh.tensor=2", 1, 16, ())]


@pytest.mark.parametrize("family,dtype,mesh,minibatches,micro,extra", EXACT_CASES)
def test_exact_mode_differentiates_the_samplers_log_probs_bit_for_bit(family, dtype, mesh, minibatches, micro,
                                                                      extra, request, tmp_path):
    # the log-probs inside the loss (the ones the gradient flows through) against the sampler's, per token, at the
    # step's first update: train_sampler_abs_max exactly 0, so its ratio (old log-probs: the sampler's) is exactly 1
    model_dir = request.getfixturevalue("tiny_moe_dir" if family == "moe" else "tiny_model_dir")
    cfg = _cfg(model_dir, tmp_path, "grpo", "train.steps=1", "checkpoint.export_hf=false",
               "rollout.consistency=exact", f"train.micro_batch_size={micro}", f"model.dtype={dtype}",
               f"algorithm.minibatches={minibatches}", "algorithm.entropy_coef=0.01",  # a gradient if all rewards are 0
               *mesh.split(), *extra)
    devices = jax.devices()[:1] if mesh == "mesh.data=1" else jax.devices()
    with RLTrainer(cfg, devices=devices) as trainer:
        trainer.train()
        assert trainer.learner.sharing.pack == (minibatches == 1)
    row = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[-1]
    assert row["train_sampler_abs_max"] == 0.0
    assert row["sampling_tries"] == (2.0 if extra else 1.0)
    if minibatches == 1:
        assert row["ratio_max"] == 1.0 and row["ratio_min"] == 1.0
    else:  # the second update's policy has moved away from the sampler
        assert row["offpolicy_kl/update0"] == 0.0 and row["offpolicy_kl/update1"] > 0.0
    assert row["grad_norm"] > 0 and row["skipped_nonfinite"] == 0.0
