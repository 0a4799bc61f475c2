"""The main job: a small model learns to reason on the arithmetic task, from scratch to RL, with a report.

    tokenizer + random Qwen3-style model -> SFT on easy worked solutions -> held-out eval (pass@k per difficulty)
    -> RL (GRPO preset) on the edge-of-competence difficulties -> held-out eval -> plots and summary.md

Everything runs on the CPU in minutes; the run directory holds every artefact (checkpoints in Hugging Face
format, metrics JSONL, evaluations, report). Every stage's config, the RL preset and overrides included, is
checked before the first stage starts. Running again in the same directory reuses the stages that finished with
the same settings and resumes an interrupted RL stage (``stages.py``); ``redo=<stage>`` recomputes a stage and
every later one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import time
from dataclasses import dataclass, field

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxrl_llm.config import ConfigError

STAGES = ("sft", "eval_sft", "rl", "eval_rl")

__all__ = ["PipelineConfig", "run_pipeline", "load_pipeline_config", "policy_config", "run_sft_stage",
           "rl_overrides", "rl_difficulties"]


@dataclass
class ModelSpec:
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    seed: int | None = None  # initialisation seed (None: the run's seed)
    num_experts: int = 0  # > 0: every MLP is a mixture of this many experts (a Qwen3-MoE-style policy)
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256


@dataclass
class SFTSpec:
    difficulties: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    slip_rate: float = 0.0  # probability that a step of a worked solution carries a slip (see tasks.arith)


@dataclass
class EvalSpec:
    difficulties: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    problems: int = 48  # held-out problems per difficulty
    n: int = 16  # samples per problem (pass@k for k <= n)
    temperature: float = 1.0


@dataclass
class RLSpec:
    preset: str = "grpo"  # a YAML file in configs/
    # difficulties trained by RL; empty: chosen from the SFT evaluation (the edge of competence)
    difficulties: list[int] = field(default_factory=list)
    # edge of competence: SFT pass@1 strictly between these bounds; the low one sits well above chance (one digit
    # in ten), where rewarded samples are mostly lucky guesses and reinforcing them teaches noise
    edge_low: float = 0.25
    edge_high: float = 0.8
    overrides: list[str] = field(default_factory=list)


@dataclass
class TaskSpec:
    """Shape of the arithmetic problems (see :class:`jaxrl_llm.tasks.ArithTask`)."""

    num_literals: int = 2
    operands: str = "any"  # any | literal


@dataclass
class PipelineConfig:
    run_dir: str = "runs/main"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    sft: SFTSpec = field(default_factory=SFTSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    rl: RLSpec = field(default_factory=RLSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    prompt_len: int = 64
    max_new_tokens: int = 72
    # recompute this stage and every later one instead of reusing them: sft | eval_sft | rl | eval_rl | all
    redo: str | None = None


def _pipeline_keys(cls=PipelineConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out += _pipeline_keys(f.default_factory, f"{prefix}{f.name}.")
    return out


def _pipeline_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "?")
    if "not in" in str(err) or "Key '" in str(err):
        close = difflib.get_close_matches(key, _pipeline_keys(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return ConfigError(f"unknown pipeline key {key!r} in {where}{hint} (RL settings go in rl.overrides)")
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    return ConfigError(f"invalid value for pipeline key {key!r} in {where}: {msg}")


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """The pipeline config from the defaults, a YAML file and ``key=value`` overrides; raises
    :class:`ConfigError` (one line naming the key) on an unknown key or a bad value."""
    from jaxrl_llm.config import parse_override

    cfg = OmegaConf.structured(PipelineConfig)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"pipeline config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = OmegaConf.merge(cfg, yaml.safe_load(f) or {})
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        except OmegaConfBaseException as err:
            raise _pipeline_error(err, path) from None
    for text in overrides:
        key, value = parse_override(text)
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)
        except OmegaConfBaseException as err:
            raise _pipeline_error(err, "the command-line overrides") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _pipeline_error(err, "the merged config") from None


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def check_pipeline(cfg: PipelineConfig, configs_dir: str):
    """Every stage's settings, before any stage starts: the pipeline's own values, then the RL stage's config
    (preset and overrides) loaded and validated against this machine's devices, with a placeholder for the SFT
    checkpoint that does not exist yet. Returns that RL config."""
    import jax

    from jaxrl_llm.config import load_config, validate
    from jaxrl_llm.tasks import ArithTask
    from jaxrl_llm.tokenizer import build_char_tokenizer

    _require(cfg.redo is None or cfg.redo in STAGES + ("all",), "redo",
             f"got {cfg.redo!r}; allowed: {', '.join(STAGES + ('all',))}")
    _require(not os.path.isfile(cfg.run_dir), "run_dir", f"{cfg.run_dir} is a file, not a directory")
    _require(cfg.task.operands in ("any", "literal"), "task.operands",
             f"got {cfg.task.operands!r}; allowed: any, literal")
    for key, value in (("sft.steps", cfg.sft.steps), ("sft.batch_size", cfg.sft.batch_size),
                       ("eval.problems", cfg.eval.problems), ("eval.n", cfg.eval.n),
                       ("prompt_len", cfg.prompt_len), ("max_new_tokens", cfg.max_new_tokens)):
        _require(value >= 1, key, f"must be >= 1, got {value}")
    for key, values in (("sft.difficulties", cfg.sft.difficulties), ("eval.difficulties", cfg.eval.difficulties),
                        ("rl.difficulties", cfg.rl.difficulties or [1])):
        _require(bool(values) and all(1 <= d <= 20 for d in values), key,
                 f"must be a non-empty list of difficulties in [1, 20], got {values}")
    _require(1 <= cfg.task.num_literals <= 5, "task.num_literals", f"must be in [1, 5], got {cfg.task.num_literals}")
    _require(0 <= cfg.rl.edge_low < cfg.rl.edge_high <= 1, "rl.edge_low",
             f"the band must satisfy 0 <= edge_low < edge_high <= 1, got [{cfg.rl.edge_low}, {cfg.rl.edge_high}]")
    preset = os.path.join(configs_dir, f"{cfg.rl.preset}.yaml")
    if not os.path.isfile(preset):
        names = sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".yaml") and f != "main.yaml")
        raise ConfigError(f"rl.preset: no preset {cfg.rl.preset!r} in {configs_dir}; allowed: {', '.join(names)}")
    task = ArithTask(1, max(cfg.eval.difficulties + cfg.sft.difficulties), **dataclasses.asdict(cfg.task))
    difficulties = cfg.rl.difficulties or [max(cfg.eval.difficulties)]  # the longest prompts the stage could see
    run_dir = os.path.abspath(cfg.run_dir)
    try:
        rl_cfg = load_config(preset, rl_overrides(cfg, task, build_char_tokenizer(), "<the SFT checkpoint>",
                                                  os.path.join(run_dir, "rl"), difficulties))
        return validate(rl_cfg, device_count=jax.device_count())
    except ConfigError as err:
        raise ConfigError(f"the RL stage (rl.preset={cfg.rl.preset}, rl.overrides): {err}") from None


def _say(msg: str) -> None:
    print(f"[jaxrl_llm] {msg}", flush=True)


def _longest(task, tok, difficulties) -> tuple[int, int]:
    """Token lengths (prompt, solution + end-of-text) of the longest problem of these difficulties."""
    problems = task.split("train", 256, seed=12345, difficulties=(max(difficulties),))
    prompt = max(len(tok(p.model_input, add_special_tokens=False)["input_ids"]) for p in problems)
    target = max(len(tok(p.solution, add_special_tokens=False)["input_ids"]) for p in problems) + 1
    return prompt, target


def rl_difficulties(cfg: PipelineConfig, sft_table: dict) -> list[int]:
    """The difficulties RL trains on: ``rl.difficulties``, else the SFT policy's edge of competence (pass@1 strictly
    inside ``(edge_low, edge_high)``), else the difficulty closest to pass@1 = 0.5."""
    if cfg.rl.difficulties:
        return list(cfg.rl.difficulties)
    edge = [d for d, r in sorted(sft_table.items()) if cfg.rl.edge_low < r["pass@1"] < cfg.rl.edge_high]
    return edge or [min(sft_table, key=lambda d: abs(sft_table[d]["pass@1"] - 0.5))]


def policy_config(cfg: PipelineConfig, tok):
    """The Qwen3-style architecture of the main job's policy."""
    from jaxrl_llm.models import ModelConfig

    m = cfg.model
    moe = dict(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
               moe_intermediate_size=m.moe_intermediate_size, moe_layers=(True,) * m.num_layers,
               norm_topk_prob=True) if m.num_experts else {}
    return ModelConfig(model_type="qwen3_moe" if moe else "qwen3", vocab_size=len(tok), hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads, qk_norm=True,
                       tie_word_embeddings=True, max_position_embeddings=4 * (cfg.prompt_len + cfg.max_new_tokens),
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **moe)


def run_sft_stage(cfg: PipelineConfig, task, tok, out_dir: str, run_dir: str | None):
    """A fresh policy trained on worked solutions of ``cfg.sft.difficulties``; returns ``(model, losses)``."""
    from flax import nnx

    from jaxrl_llm.models import Decoder
    from jaxrl_llm.sft import run_sft
    from jaxrl_llm.tasks import worked_solution

    init_seed = cfg.seed if cfg.model.seed is None else cfg.model.seed
    model = Decoder(policy_config(cfg, tok), rngs=nnx.Rngs(init_seed))
    slips = random.Random(f"slips-{cfg.seed}")
    examples = ((p.model_input, worked_solution(p.prompt, slips, cfg.sft.slip_rate))
                for p in task.stream("train", cfg.seed, difficulties=tuple(cfg.sft.difficulties)))
    # SFT problems are short: padding them only to their own longest shape roughly halves the cost of a step
    prompt_len, target_len = _longest(task, tok, cfg.sft.difficulties)
    losses = run_sft(model, tok, examples, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size,
                     prompt_len=prompt_len, target_len=target_len, lr=cfg.sft.lr, out_dir=out_dir, run_dir=run_dir)
    return model, losses


def rl_overrides(cfg: PipelineConfig, task, tok, sft_dir: str, rl_dir: str, difficulties) -> list[str]:
    """The RL stage's config overrides: start from the SFT checkpoint, train on ``difficulties``."""
    # rollouts only as long as the hardest RL problem needs, plus room to ramble (which rewards then judge)
    rl_prompt_len, rl_target_len = _longest(task, tok, difficulties)
    max_new = min(cfg.max_new_tokens, rl_target_len + 16)
    # DAPO's soft overlong penalty starts after the longest correct solution, never on one
    cache = max(max_new - rl_target_len, 1)
    return [f"model.path={sft_dir}", f"log.run_dir={rl_dir}",
            "data.source=task", f"data.max_prompt_tokens={rl_prompt_len}",
            f"rollout.max_new_tokens={max_new}", f"algorithm.overlong_cache={cache}", f"data.seed={cfg.seed}",
            f"train.seed={cfg.seed}", "data.task_kwargs=" + json.dumps(
                {"difficulties": list(difficulties), "max_ops": max(difficulties), "num_problems": 20000,
                 **dataclasses.asdict(cfg.task)}), *cfg.rl.overrides]


def _sft_losses(run_dir: str) -> list[float]:
    from jaxrl_llm.tracking import read_jsonl

    path = os.path.join(run_dir, "sft_metrics.jsonl")
    return [r["sft_loss"] for r in read_jsonl(path)] if os.path.exists(path) else [float("nan")]


def _evaluate(cfg: PipelineConfig, policy, tok, problems: dict, run_dir: str, label: str) -> dict:
    from jaxrl_llm.evaluate import evaluate_pass_at_k

    t0 = time.perf_counter()
    table = evaluate_pass_at_k(policy, tok, problems, n=cfg.eval.n, temperature=cfg.eval.temperature,
                               max_new_tokens=cfg.max_new_tokens, prompt_len=cfg.prompt_len, seed=cfg.seed)
    row = "  ".join(f"d{d}:{r['pass@1']:.2f}/{r.get('pass@16', float('nan')):.2f}" for d, r in table.items())
    _say(f"    {label} pass@1/pass@16 per difficulty: {row}  ({time.perf_counter() - t0:.0f}s)")
    with open(os.path.join(run_dir, f"eval_{label}.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    return table


def _eval_stage(log, stage: str, cfg: PipelineConfig, load_policy, tok, problems, run_dir: str) -> dict:
    """The evaluation table of ``stage`` (eval_sft / eval_rl), reused from its JSON file when it can be."""
    label = stage.split("_")[1]
    path = os.path.join(run_dir, f"eval_{label}.json")
    settings = [dataclasses.asdict(cfg.eval), cfg.seed, cfg.prompt_len, cfg.max_new_tokens]
    if log.decide(stage, settings) == "reuse" and os.path.exists(path):
        _say(f"    reusing {path}")
        with open(path, encoding="utf-8") as f:
            return {int(d): r for d, r in json.load(f).items()}
    table = _evaluate(cfg, load_policy(), tok, problems, run_dir, label)
    log.done(stage)
    return table


def run_pipeline(cfg: PipelineConfig, configs_dir: str) -> str:
    from jaxrl_llm.config import load_config
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.report import write_report
    from jaxrl_llm.stages import StageLog
    from jaxrl_llm.tasks import ArithTask
    from jaxrl_llm.tokenizer import build_char_tokenizer
    from jaxrl_llm.tracking import read_jsonl
    from jaxrl_llm.trainer.rl import train

    start = time.perf_counter()
    check_pipeline(cfg, configs_dir)  # every stage's config, before the first stage starts
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "pipeline.yaml"), "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    log = StageLog(run_dir, STAGES, cfg.redo)
    task = ArithTask(1, max(cfg.eval.difficulties + cfg.sft.difficulties), **dataclasses.asdict(cfg.task))
    tok = build_char_tokenizer()
    mcfg = policy_config(cfg, tok)
    sft_dir, rl_dir = os.path.join(run_dir, "sft"), os.path.join(run_dir, "rl")
    _say(f"1/5 SFT: Qwen3-style policy with {mcfg.num_params():,} parameters on difficulties "
         f"{cfg.sft.difficulties} ({cfg.sft.steps} steps x {cfg.sft.batch_size} worked solutions)")
    model = None
    sft_settings = [cfg.seed, dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.sft), dataclasses.asdict(cfg.task)]
    if log.decide("sft", sft_settings) == "reuse" and os.path.isfile(os.path.join(sft_dir, "config.json")):
        _say(f"    reusing the SFT checkpoint in {sft_dir} (redo=sft recomputes it)")
        losses = _sft_losses(run_dir)
    else:
        model, losses = run_sft_stage(cfg, task, tok, sft_dir, run_dir)
        log.done("sft")
    _say(f"    SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}; checkpoint: {sft_dir}")

    eval_problems = {d: task.split("eval", cfg.eval.problems, seed=cfg.seed, difficulties=(d,))
                     for d in cfg.eval.difficulties}
    _say("2/5 evaluating the SFT policy on held-out problems")
    before = _eval_stage(log, "eval_sft", cfg, lambda: model if model is not None else load_hf(sft_dir)[0], tok,
                         eval_problems, run_dir)
    difficulties = rl_difficulties(cfg, before)
    _say(f"3/5 RL ({cfg.rl.preset}) on the edge of competence: difficulties {difficulties}")
    overrides = rl_overrides(cfg, task, tok, sft_dir, rl_dir, difficulties)
    decision = log.decide("rl", [overrides, cfg.rl.preset])
    if decision == "fresh":  # checkpoints of another SFT policy or other settings: start over
        overrides.append("checkpoint.overwrite=true")
    rl_cfg = load_config(os.path.join(configs_dir, f"{cfg.rl.preset}.yaml"), overrides)
    policy = None
    if decision == "reuse" and os.path.isfile(os.path.join(rl_dir, "hf", "config.json")):
        _say(f"    reusing the RL policy in {rl_dir}/hf (redo=rl recomputes it)")
    else:
        _, policy = train(rl_cfg, return_model=True)
        log.done("rl")
    _say("4/5 evaluating the RL policy on held-out problems")
    after = _eval_stage(log, "eval_rl", cfg,
                        lambda: policy if policy is not None else load_hf(os.path.join(rl_dir, "hf"))[0], tok,
                        eval_problems, run_dir)
    _say("5/5 writing the report")
    rows = read_jsonl(os.path.join(rl_dir, "metrics.jsonl"))
    notes = {
        "model": f"Qwen3-style decoder, {mcfg.num_params():,} parameters, char tokenizer ({len(tok)} tokens)",
        "SFT": f"{cfg.sft.steps} steps on difficulties {cfg.sft.difficulties} (slip rate {cfg.sft.slip_rate}), "
               f"loss {losses[0]:.3f} -> "
               f"{losses[-1]:.3f}",
        "RL": f"{cfg.rl.preset}, {rl_cfg.train.steps} steps x {rl_cfg.train.prompts_per_step} prompts x "
              f"{rl_cfg.rollout.n} samples on difficulties {difficulties}",
        "evaluation": f"{cfg.eval.problems} held-out problems per difficulty, {cfg.eval.n} samples each, "
                      f"temperature {cfg.eval.temperature}",
        "wall time": f"{time.perf_counter() - start:.0f} s",
    }
    path = write_report(os.path.join(run_dir, "report"), rows, before, after, difficulties, notes)
    _say(f"done in {time.perf_counter() - start:.0f} s. Report: {path}")
    return path
