"""Command-line entry point: ``jaxrl-llm <command> ...``.

    jaxrl-llm pipeline [--config configs/main.yaml] [key=value ...]   the main job: SFT -> RL -> eval -> report
    jaxrl-llm train --config configs/grpo.yaml [key=value ...]        RL training from a YAML config
    jaxrl-llm sft --out DIR [key=value ...]                           SFT stage of the main job only
    jaxrl-llm eval --model DIR [--difficulties 1 2 3] [--n 16]        held-out pass@k on the arithmetic task
    jaxrl-llm demo                                                    a 30-second GRPO demonstration
    jaxrl-llm plan --config C --mesh fsdp=8 --accelerator h100        will the run fit? (ahead-of-time memory plan)
    jaxrl-llm report RUN_DIR [--out DIR]                              plots and summary.md of a train or pipeline run

Commands import their heavy dependencies lazily so ``jaxrl-llm --help`` is instant.

Exit codes (:mod:`jaxrl_llm.errors`): 0 done, 1 crash (traceback), 2 user error (one line naming the key, file
or value; ``--debug`` shows the traceback), 3 diverged, 4 reward function failing, 75 interrupted by SIGTERM,
SIGINT or a preemption notice after saving a checkpoint (the same command resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _demo(args) -> int:
    from jaxrl_llm.demo import run_demo

    return run_demo(seed=args.seed)


def _train(args) -> int:
    from jaxrl_llm.distributed import initialize

    # before any JAX backend starts: joins a multi-process run when flags or the environment describe one
    initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.init_timeout)
    from jaxrl_llm.config import load_config
    from jaxrl_llm.trainer.rl import train

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg)
    import jax

    if jax.process_index() == 0 and not metrics:
        print(f"[jaxrl_llm] nothing to train: the run in {cfg.log.run_dir} had reached train.steps="
              f"{cfg.train.steps} (raise it to continue, or set checkpoint.overwrite=true to start afresh)")
    elif jax.process_index() == 0:
        print(json.dumps({k: round(v, 6) for k, v in metrics.items()}, indent=1))
        if cfg.log.report and cfg.log.jsonl:
            from jaxrl_llm.report import write_train_report

            print(f"[jaxrl_llm] report: {write_train_report(cfg.log.run_dir)}")
    return 0


def _report(args) -> int:
    from jaxrl_llm.report import report_run_dir

    try:
        path = report_run_dir(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"report error: {err}", file=sys.stderr)
        return 2
    print(f"report written: {path}")
    return 0


def _pipeline(args) -> int:
    from jaxrl_llm.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(args.config, args.overrides)
    run_pipeline(cfg, CONFIGS_DIR)
    return 0


def _sft(args) -> int:
    from jaxrl_llm.pipeline import load_pipeline_config, run_sft_stage
    from jaxrl_llm.tasks import ArithTask
    from jaxrl_llm.tokenizer import build_char_tokenizer

    cfg = load_pipeline_config(args.config, args.overrides)
    task = ArithTask(1, max(cfg.sft.difficulties), cfg.task.num_literals, cfg.task.operands)
    run_sft_stage(cfg, task, build_char_tokenizer(), args.out, args.out)
    print(f"SFT checkpoint written to {args.out}")
    return 0


def _eval(args) -> int:
    from jaxrl_llm.evaluate import evaluate_pass_at_k
    from jaxrl_llm.models import load_hf
    from jaxrl_llm.tasks import ArithTask
    from jaxrl_llm.tokenizer import load_tokenizer

    from jaxrl_llm.errors import blame

    with blame("--model", args.model):
        model, _ = load_hf(args.model)
        tok = load_tokenizer(args.model)
    task = ArithTask(1, max(args.difficulties), args.num_literals, args.operands)
    problems = {d: task.split("eval", args.problems, seed=args.seed, difficulties=(d,)) for d in args.difficulties}
    table = evaluate_pass_at_k(model, tok, problems, n=args.n, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len, seed=args.seed)
    print(json.dumps(table, indent=1))
    return 0


def _plan(args) -> int:
    from jaxrl_llm.plan import PlanError, run_cli

    try:
        return run_cli(args)
    except PlanError as err:
        print(f"plan error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-llm", description="JAX-native reinforcement learning for LLMs.")
    debug = "show the full traceback of a user error (config, files) or of a stopped run"
    parser.add_argument("--debug", action="store_true", help=debug)
    sub = parser.add_subparsers(dest="command", required=True)
    # also accepted after the command; SUPPRESS keeps the main parser's value when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add("pipeline", help="the main job: SFT -> RL -> eval -> report on the arithmetic task")
    p.add_argument("--config", default=os.path.join(CONFIGS_DIR, "main.yaml"))
    p.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline config")
    p.set_defaults(func=_pipeline)

    p = add("train", help="RL training from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--coordinator", help="host:port of process 0 for a multi-process run (or JAXRL_COORDINATOR); "
                                         "SLURM and TPU slices are detected without it")
    p.add_argument("--num-processes", type=int, help="processes in the run (or JAXRL_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="this process's rank (or JAXRL_PROCESS_ID)")
    p.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for the other processes")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_train)

    p = add("sft", help="supervised stage of the main job")
    p.add_argument("--out", required=True, help="directory for the Hugging Face checkpoint")
    p.add_argument("--config", default=os.path.join(CONFIGS_DIR, "main.yaml"))
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_sft)

    p = add("eval", help="held-out pass@k per difficulty on the arithmetic task")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (with tokenizer)")
    p.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=72)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-literals", type=int, default=2, help="task shape, as the pipeline's task.num_literals")
    p.add_argument("--operands", choices=("any", "literal"), default="any", help="as the pipeline's task.operands")
    p.set_defaults(func=_eval)

    p = add("report", help="plots and summary.md of a train or pipeline run directory")
    p.add_argument("run_dir", help="the run directory (log.run_dir of a train run, run_dir of a pipeline run)")
    p.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    p.set_defaults(func=_report)

    p = add("demo", help="a short GRPO demonstration on a toy objective")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = add("plan", help="ahead-of-time per-device memory plan of an RL config on a target mesh")
    p.add_argument("--config", help="RL config YAML (as for train)")
    p.add_argument("--mesh", help="target mesh, e.g. data=1,fsdp=8,tensor=8 (default: the config's mesh)")
    p.add_argument("--devices", type=int, help="device count of the target (default: the mesh's product)")
    p.add_argument("--accelerator", help="tpu-v5e | tpu-v5p | tpu-v6e | h100 | h200 | a100-80g | cpu")
    p.add_argument("--model-config", help="config.json, checkpoint directory or preset (qwen3-8b, qwen3-1.7b, ...); "
                                          "default: model.path")
    p.add_argument("--analytic", action="store_true", help="formula estimate only, no compilation")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for compiling on fake CPU devices")
    p.add_argument("--backend", choices=("auto", "local", "cpu"), default="auto",
                   help="compile on this process's devices (local) or on fake CPU devices in a subprocess (cpu)")
    p.add_argument("--mem-fraction", type=float, help="usable fraction of HBM (default: 1 on TPU, 0.75 on GPU)")
    p.add_argument("--no-suggest", action="store_true", help="do not re-evaluate suggestions when it does not fit")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_plan)
    return parser


def _compilation_cache() -> None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so a resumed or repeated run does not
    compile them again. ``JAXRL_COMPILATION_CACHE``: a directory, or ``off``; default
    ``$XDG_CACHE_HOME/jaxrl_llm/xla`` (``~/.cache/...``). A ``JAX_COMPILATION_CACHE_DIR`` already set wins.
    Set through the environment because JAX reads it when first imported, which the commands do lazily."""
    choice = os.environ.get("JAXRL_COMPILATION_CACHE", "")
    if choice.lower() == "off" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = choice or os.path.join(base, "jaxrl_llm", "xla")


def main(argv: list[str] | None = None) -> int:
    from jaxrl_llm.errors import run_command

    args = build_parser().parse_args(argv)
    _compilation_cache()
    return run_command(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
