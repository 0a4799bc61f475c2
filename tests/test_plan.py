"""`jaxrl-llm plan`: the planner's figures against the real trainer's arrays and XLA's analysis of its programs."""
import importlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import cli
from jaxrl_llm import plan as planner
from jaxrl_llm.config import load_config
from jaxrl_llm.models import Decoder, ModelConfig, save_hf
from jaxrl_llm.tokenizer import build_char_tokenizer
from jaxrl_llm.trainer.rl import RLTrainer

score_module = importlib.import_module("jaxrl_llm.sampling.score")  # the package exports a function `score`
GRPO = os.path.join(os.path.dirname(__file__), "..", "configs", "grpo.yaml")
MESH = "data=1,fsdp=4,tensor=2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3-style checkpoint: hidden 64, 2 layers, vocabulary 256."""
    path = str(tmp_path_factory.mktemp("plan_model"))
    tok = build_char_tokenizer()
    cfg = ModelConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))  # weights from numpy: no init programs to compile
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jax.numpy.asarray(rng.normal(0.0, 0.02, var.get_value().shape), np.float32))
    save_hf(model, path, tokenizer=tok)
    return path


def _overrides(model_dir, run_dir):
    # max_new_tokens=16: the trainer trims responses to a multiple of 16, so its update sees the planned shapes
    return [f"model.path={model_dir}", f"log.run_dir={run_dir}", "train.steps=1", "train.prompts_per_step=8",
            "rollout.n=4", "rollout.max_new_tokens=16", "data.max_prompt_tokens=40", "train.micro_batch_size=8",
            "algorithm.minibatches=2", "data.task_kwargs={num_problems: 64, max_ops: 2}", "log.tensorboard=false",
            "log.progress=false", "checkpoint.async_save=false", "checkpoint.export_hf=false"]


def _device0_bytes(tree) -> int:
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == d0)


def _spy(fn, record: list, static: int = 0, calls: list | None = None):
    """Wrap a jitted function (``static`` leading static arguments, static keywords): record XLA's memory
    analysis of each call (and in ``calls`` the lowered program) and run the very executable it describes."""
    def wrapper(*args, **kwargs):
        lowered = fn.lower(*args, **kwargs)
        compiled = lowered.compile()
        record.append(planner.ProgramMemory.of(compiled))
        if calls is not None:
            calls.append(lowered)
        return compiled(*args[static:])
    return wrapper


@pytest.fixture(scope="module")
def measured(model_dir, tmp_path_factory):
    """One real training step of the trainer on the 8-device mesh, with its programs' memory analyses, and the
    plan of the same config (compiled on 8 fake devices in a subprocess)."""
    run_dir = tmp_path_factory.mktemp("plan_run")
    overrides = _overrides(model_dir, run_dir)
    mesh = dict(zip(planner.MESH_AXES, (1, 4, 2, 1)))
    cfg = load_config(GRPO, overrides + [f"mesh.{k}={v}" for k, v in mesh.items()])
    trainer = RLTrainer(cfg)
    update, generate, scoring, lowered = [], [], [], {"update": [], "generate": [], "score": []}
    trainer.learner._update = _spy(trainer.learner._update, update, calls=lowered["update"])
    trainer.sampler._generate = _spy(trainer.sampler._generate, generate, static=1, calls=lowered["generate"])
    original_score = score_module._jitted_score
    spied = _spy(original_score(), scoring, static=1, calls=lowered["score"])
    score_module._jitted_score = lambda: spied
    try:
        resident = {"params": _device0_bytes(trainer.learner.params),
                    "opt_state": _device0_bytes(trainer.learner.opt_state)}
        trainer.train_step()
    finally:
        score_module._jitted_score = original_score
        trainer.close()
    # the plan of the same config, compiled in a subprocess after the trainer's step: the same programs, so the
    # subprocess finds them in the tests' compilation cache
    report = planner.plan(GRPO, overrides, mesh=MESH, accelerator="tpu-v5e", backend="cpu")
    planned = {}  # the planner's programs for the same config, compiled here on the same devices
    planner.compile_plan(cfg, planner.resolve_model(model_dir), mesh, lowered=planned)
    return dict(resident, update=update[0], generate=generate[0], score=scoring[0], report=report,
                trainer_programs={k: v[0] for k, v in lowered.items()}, planned_programs=planned)


def test_the_planner_compiles_the_trainers_own_programs(measured):
    # the same functions with the same arguments (shapes, dtypes, placements, static settings): the same StableHLO.
    # In this config the trainer's step has the planned shapes (16-token responses, no packing)
    for name in ("update", "generate", "score"):
        trainer, planned = measured["trainer_programs"][name], measured["planned_programs"][name]
        assert trainer.as_text() == planned.as_text(), name


def test_the_planner_compiles_the_trainers_exact_mode_update(model_dir, tmp_path):
    # exact consistency's update carries the rows' lengths and runs the sampler's decode loop: one device, two
    # minibatches (no packing, so the trainer's shapes are the planned ones)
    overrides = _overrides(model_dir, tmp_path) + ["rollout.consistency=exact", "mesh.data=1"]
    cfg = load_config(GRPO, overrides)
    with RLTrainer(cfg, devices=jax.devices()[:1]) as trainer:
        update, calls = [], []
        trainer.learner._update = _spy(trainer.learner._update, update, calls=calls)
        trainer.train_step()
    planned = {}
    planner.compile_programs(cfg, planner.resolve_model(model_dir), dict(data=1, fsdp=1, tensor=1, expert=1),
                             ("update",), lowered=planned)
    assert calls[0].as_text() == planned["update"].as_text()


def test_params_and_optimizer_match_the_trainers_arrays(measured):
    report = measured["report"]
    assert report.backend == "8 fake CPU devices"
    c, a = report.compiled, report.analytic
    assert c.params == measured["params"]
    assert c.opt_state == measured["opt_state"]
    assert abs(a.params - measured["params"]) <= 0.1 * measured["params"]  # norms are replicated, not split
    # Adam's two moments are sharded like their parameters (+ a replicated step count), not replicated
    assert measured["opt_state"] <= 2 * measured["params"] + 64


def test_scoring_keeps_rows_split_and_gathers_the_weights(tmp_path):
    """Under the trainer's mesh the log-prob forward holds only its rows' share of the [rows, chunk, vocab]
    logits; without the row constraint XLA gathers the activations (every device computes every row)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrl_llm.parallel import Layout, make_mesh
    from jaxrl_llm.plan.programs import _abstract_policy
    from jaxrl_llm.sampling import sequence_logprobs

    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="qwen3", vocab_size=32768, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=256)))
    cfg = load_config(GRPO, [f"model.path={config}", "mesh.data=1", "mesh.fsdp=8"])
    mesh = make_mesh(dict(data=1, fsdp=8))
    _, graphdef, params, rest = _abstract_policy(cfg, planner.resolve_model(str(config)), Layout(mesh))
    rows, t, chunk = 64, 64, 64
    arr = lambda dtype: jax.ShapeDtypeStruct((rows, t), dtype, sharding=NamedSharding(mesh, P("fsdp")))  # noqa: E731

    def fwd(state, ids, mask):
        return sequence_logprobs(nnx.merge(graphdef, state), ids, mask, ids, mask, chunk=chunk)

    def temp():
        args = (nnx.merge_state(params, rest), arr(np.int32), arr(np.bool_))
        return jax.jit(fwd).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits = rows * chunk * 32768 * 4  # one chunk of float32 logits for every row
    with jax.set_mesh(mesh):
        split = temp()
    assert split < 0.5 * logits  # an eighth of the rows' logits (+ their exp), not all of them
    assert temp() > logits  # without the mesh: XLA's own choice holds every row's logits


def test_phase_peaks_match_xla_analysis_of_the_trainers_programs(measured):
    c = measured["report"].compiled
    params, opt = measured["params"], measured["opt_state"]
    update = measured["update"].peak
    sampling = params + opt + measured["generate"].peak - params  # the sampler's arguments include the params
    scoring = params + opt + measured["score"].peak - params
    expected = {"update": update, "sampling": sampling, "scoring": scoring}
    for phase, value in expected.items():
        assert abs(c.phases[phase] - value) <= 0.1 * value, (phase, c.phases[phase], value)
    assert abs(c.total - max(expected.values())) <= 0.1 * max(expected.values())
    # the update's temporaries (gradients, activations) on their own, not just the sum
    assert abs(c.update_temp - measured["update"].temp) <= 0.1 * measured["update"].temp


def test_analytic_kv_cache_formula():
    cfg = load_config(GRPO, ["model.path=qwen3-8b", "train.prompts_per_step=16", "rollout.n=8",
                             "data.max_prompt_tokens=512", "rollout.max_new_tokens=1536", "model.dtype=bfloat16",
                             "train.micro_batch_size=16"])
    mc = planner.resolve_model("qwen3-8b")
    assert abs(mc.num_params() - 8.19e9) < 0.01e9  # Qwen3-8B
    sizes = dict(data=1, fsdp=8, tensor=1, expert=1)
    a = planner.analytic_plan(cfg, mc, sizes)
    assert a.kv_cache == 36 * 2 * (128 // 8) * 2048 * 8 * 128 * 2  # layers x (k, v) x rows/8 x slots x kv x hd x 2B
    assert a.params == mc.num_params() * 4 // 8 and a.opt_state == 2 * a.params
    a4 = planner.analytic_plan(cfg, mc, dict(sizes, tensor=4))  # 8 KV heads split 4 ways, parameters too
    assert a4.kv_cache * 4 == a.kv_cache and a4.params * 4 == a.params


def test_analytic_disaggregated_and_async_sampling():
    base = ["model.path=qwen3-8b", "train.prompts_per_step=16", "rollout.n=8", "train.micro_batch_size=16",
            "model.dtype=bfloat16"]
    mc = planner.resolve_model("qwen3-8b")
    sizes = dict(data=1, fsdp=8, tensor=1, expert=1)
    same = planner.analytic_plan(load_config(GRPO, base), mc, sizes)
    # 4 devices of their own: each holds all the weights (replicated) and the KV cache of a quarter of the rows
    own = planner.analytic_plan(load_config(GRPO, base + ["rollout.sampler_devices=4"]), mc, sizes)
    assert own.sample_io == mc.num_params() * 4 and own.kv_cache == same.kv_cache * 8 // 4
    assert own.phases["sampling"] == own.sample_temp + own.sample_io  # nothing of the trainer's
    assert own.phases["update"] == same.phases["update"]
    # async on the trainer's devices: the next rollout's copy of the weights stays resident
    copy = planner.analytic_plan(load_config(GRPO, base + ["rollout.async_rollout=true"]), mc, sizes)
    assert copy.phases["update"] == same.phases["update"] + same.params
    with pytest.raises(planner.PlanError, match=r"has 8 devices \+ 4 sampler devices .* but --devices is 8"):
        planner.resolve_mesh(sizes, 8, 4)


def test_mesh_that_does_not_match_the_devices_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(planner.PlanError, match="has 8 devices but --devices is 16"):
        planner.plan(GRPO, _overrides(model_dir, tmp_path), mesh=MESH, devices=16, analytic_only=True)
    with pytest.raises(planner.PlanError, match="the mesh needs 16 devices, this process has 8"):
        planner.plan(GRPO, _overrides(model_dir, tmp_path) + ["train.micro_batch_size=16"], mesh="fsdp=16",
                     backend="local")
    with pytest.raises(planner.PlanError, match="unknown axis 'pipeline'"):
        planner.parse_mesh("pipeline=2")


def test_unknown_accelerator_is_a_clear_error(model_dir, tmp_path, capsys):
    with pytest.raises(planner.PlanError, match="unknown accelerator 'tpu-v9'; known: tpu-v5e"):
        planner.plan(GRPO, _overrides(model_dir, tmp_path), mesh=MESH, accelerator="tpu-v9")
    code = cli.main(["plan", "--config", GRPO, "--mesh", MESH, "--accelerator", "tpu-v9",
                     *_overrides(model_dir, tmp_path)])
    assert code == 2 and "plan error: unknown accelerator 'tpu-v9'" in capsys.readouterr().err


def test_cli_prints_the_plan_and_its_verdict(model_dir, tmp_path, capsys):
    args = ["plan", "--config", GRPO, "--mesh", "fsdp=8", "--model-config", "qwen3-8b", "--analytic", "--json",
            "--accelerator", "h100", "model.dtype=bfloat16", "train.micro_batch_size=32", "rollout.n=8",
            "train.prompts_per_step=16", "data.max_prompt_tokens=512", "rollout.max_new_tokens=1536"]
    code = cli.main(args)
    out = json.loads(capsys.readouterr().out)
    cfg = load_config(GRPO, ["model.path=qwen3-8b", "mesh.data=1", "mesh.fsdp=8"] + args[-6:])
    expected = planner.analytic_plan(cfg, planner.resolve_model("qwen3-8b"), dict(data=1, fsdp=8, tensor=1, expert=1))
    assert out["analytic"]["params"] == expected.params == 8_190_735_360 * 4 // 8
    assert out["total"] == expected.total > out["usable"] == int(80 * planner.GiB * 0.75)  # JAX's GPU default
    assert code == 1 and out["fits"] is False
    # suggestions, each re-evaluated: the first micro-batch size that fits (or the smallest), remat, ...
    labels = [s["label"] for s in out["suggestions"]]
    assert labels[0].startswith("train.micro_batch_size=") and "model.remat=full" in labels
    assert all(s["plan"]["total"] < expected.total for s in out["suggestions"])
    assert out["suggestions"][-1]["label"] == "all of the above" and out["suggestions"][-1]["fits"]


def test_cli_compiles_here_when_this_process_has_the_devices(model_dir, tmp_path, capsys):
    config = tmp_path / "config.json"  # a model config alone is enough: nothing is loaded or allocated
    with open(os.path.join(model_dir, "config.json")) as f:
        config.write_text(f.read())
    # the trainer test's settings (without its model.path): the programs it compiled, found in the tests' cache
    overrides = [o for o in _overrides(model_dir, tmp_path) if not o.startswith("model.path=")]
    code = cli.main(["plan", "--config", GRPO, "--mesh", MESH, "--model-config", str(config), "--accelerator",
                     "tpu-v5e", *overrides])
    out = capsys.readouterr().out
    assert code == 0 and "compiled ahead of time on 8 local cpu devices" in out and "fits tpu-v5e" in out
    params = out.split("parameters (float32)")[1].split()
    analytic, compiled = float(params[0]), float(params[2])  # MiB
    assert params[1] == params[3] == "MiB" and abs(compiled - analytic) <= 0.1 * analytic


def test_remat_auto_recomputes_layers_for_long_responses():
    from jaxrl_llm.models.remat import AUTO_FULL_RESPONSE_TOKENS, resolve_remat

    assert resolve_remat("auto", AUTO_FULL_RESPONSE_TOKENS - 1) == "none"
    assert resolve_remat("auto", AUTO_FULL_RESPONSE_TOKENS) == "full"
    assert resolve_remat("dots", 32768) == "dots" and resolve_remat("none", 32768) == "none"
    assert load_config(GRPO, ["model.path=x"]).model.remat == "auto"


@pytest.mark.parametrize("kernel", ["blockwise", "dense"])
def test_analytic_update_memory_per_doubling_of_the_length(kernel):
    # a memory-linear kernel with layers recomputed: each doubling of the response at most doubles the update's
    # activations (at most 2.2x per doubling); the [t, t] scores of dense attention grow 2.5x to 3.6x from 4k to 32k
    mc = planner.resolve_model("qwen3-1.7b")
    sizes = dict(data=1, fsdp=8, tensor=1, expert=1)

    def acts(length):
        cfg = load_config(GRPO, ["model.path=qwen3-1.7b", "data.max_prompt_tokens=512", "model.dtype=bfloat16",
                                 f"rollout.max_new_tokens={length}", "train.micro_batch_size=8",
                                 f"model.attention={kernel}", "model.remat=full"])
        a = planner.analytic_plan(cfg, mc, sizes)
        # gradients, optimizer temporaries and the unembedding (gathered in float32, and its float32 gradient
        # accumulator) do not grow with the length
        unembedding = mc.hidden_size * mc.vocab_size * (4 + 4)
        return a.update_temp - 3 * a.params - a.opt_state - unembedding

    growth = [acts(2 * length) / acts(length) for length in (4096, 8192, 16384)]
    if kernel == "blockwise":
        assert all(1.2 < g <= 2.2 for g in growth), growth
    else:
        assert all(g > 2.5 for g in growth), growth


@pytest.mark.slow
def test_fsdp_gathers_weights_a_layer_at_a_time(tmp_path):
    # with weights split over fsdp=8, the compiled temporaries of scoring and the update must not hold every
    # layer's gathered weights: going from 2 to 6 layers may add the extra layers' shards and their gradients,
    # not 4 gathered layers (which a plain loop of layers gives: XLA hoists every gather out of the micro-batch loop)
    def temps(layers):
        path = tmp_path / f"c{layers}.json"
        path.write_text(json.dumps(dict(model_type="qwen3", vocab_size=1024, hidden_size=512, intermediate_size=2048,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=64, max_position_embeddings=512, tie_word_embeddings=True)))
        cfg = load_config(GRPO, [f"model.path={path}", "mesh.data=1", "mesh.fsdp=8", "rollout.max_new_tokens=64",
                                 "data.max_prompt_tokens=32", "train.micro_batch_size=8", "train.prompts_per_step=8",
                                 "rollout.n=8"])
        programs = planner.compile_programs(cfg, planner.resolve_model(str(path)),
                                            dict(data=1, fsdp=8, tensor=1, expert=1), ("update", "score"))
        assert "generate" not in programs  # scoring by micro-batches needs no sampler program
        return programs["score"].temp, programs["update"][0].temp

    layer = 4 * (4 * 512 * 512 + 3 * 512 * 2048)  # one layer's weights gathered, float32 (q, k, v, o ~ 4 x 512^2)
    (score2, update2), (score6, update6) = temps(2), temps(6)
    assert score6 - score2 < layer, (score2, score6, layer)
    assert update6 - update2 < 2 * layer, (update2, update6, layer)


@pytest.mark.slow
def test_the_update_on_an_fsdp_mesh_holds_no_array_of_the_whole_micro_batch(tmp_path):
    # each device works on its own rows; an array with as many values as the whole micro-batch's hidden states
    # means something was gathered or padded to the global batch on every device (the transpose of taking one
    # element of a flattened row-sharded array is such a pad)
    import re

    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="qwen3", vocab_size=256, hidden_size=256, intermediate_size=256,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    max_position_embeddings=512, tie_word_embeddings=True)))
    cfg = load_config(GRPO, [f"model.path={path}", "mesh.data=1", "mesh.fsdp=8", "rollout.max_new_tokens=256",
                             "data.max_prompt_tokens=32", "train.micro_batch_size=8", "train.prompts_per_step=1",
                             "rollout.n=8", "model.remat=full", "model.dtype=bfloat16"])
    lowered = {}
    planner.compile_programs(cfg, planner.resolve_model(str(path)), dict(data=1, fsdp=8, tensor=1, expert=1),
                             ("update",), lowered=lowered)
    text = lowered["update"].compile().as_text()
    shapes = re.findall(r"\b(?:bf16|f32)\[([0-9,]*)\]", text)
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes]
    whole_batch = 8 * 256 * 256  # rows x response tokens x hidden
    assert sizes and max(sizes) < whole_batch, max(sizes)
