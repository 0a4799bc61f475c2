"""Seconds per GRPO optimizer step: jaxrl_llm's trainer vs TRL's GRPOTrainer, same weights, task and batch (CPU).

Model: a random tiny Qwen3 (hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, MLP 768, fp32) with the
project's character tokenizer, saved once in Hugging Face format and loaded by both trainers.
Batch: 8 prompts x 8 samples, prompts of the arithmetic task (at most 32 tokens), up to 64 completion tokens,
temperature 1, one optimizer step per batch, the task's exact-answer reward. The two trainers take turns, one step
each, so that a slow spell of the shared machine hits both alike; TRL runs in a process of its own (`peers.py`).
The first steps (compilation, warm-up) are excluded; the median of the remaining steps is reported for each, and
their ratio.

    pip install trl   # not a dependency of jaxrl_llm
    python benchmarks/grpo_step.py [--steps 10]

``--consistency exact`` instead compares jaxrl_llm's step in ``rollout.consistency=exact`` mode with its default
step (same batch, the two trainers taking turns in this process; no TRL needed): the cost of exact mode, for the
whole step and for its rollout + scoring.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.config import load_config
from jaxrl_llm.models import Decoder, ModelConfig, save_hf
from jaxrl_llm.tasks import ArithTask, score_completion
from jaxrl_llm.tokenizer import build_char_tokenizer
from jaxrl_llm.trainer.rl import RLTrainer
from peers import Peer, trl_worker
from timing import PAUSE, machine

PROMPTS, N, PROMPT_LEN, NEW = 8, 8, 32, 64
WARMUP = 2
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def build_model(path: str) -> None:
    tok = build_char_tokenizer()
    cfg = ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)


def rows(count: int) -> list[dict]:
    return [p.as_row() for p in ArithTask(1, 3).split("train", count, seed=0)]


def benchmark_trainer(model_dir: str, run_dir: str, steps: int, extra: tuple[str, ...] = ("mesh.data=1",),
                      devices=None, micro_batch: int = PROMPTS * N) -> RLTrainer:
    """jaxrl_llm's GRPO trainer on the benchmark batch (one device by default)."""
    cfg = load_config(os.path.join(CONFIGS, "grpo.yaml"), [
        f"model.path={model_dir}", f"log.run_dir={run_dir}", "data.source=task",
        "data.task_kwargs={max_ops: 3, num_problems: 2000}", f"data.max_prompt_tokens={PROMPT_LEN}",
        f"rollout.n={N}", f"rollout.max_new_tokens={NEW}", f"train.prompts_per_step={PROMPTS}",
        f"train.micro_batch_size={micro_batch}", "train.lr=1e-5", f"train.steps={steps}",
        "log.progress=false", "log.tensorboard=false", "checkpoint.export_hf=false", "checkpoint.async_save=false",
        *extra])
    return RLTrainer(cfg, devices=jax.devices()[:1] if devices is None else devices)


def time_jaxrl(model_dir: str, run_dir: str, steps: int, extra: tuple[str, ...] = ("mesh.data=1",),
               devices=None, micro_batch: int = PROMPTS * N, phases: dict | None = None) -> list[float]:
    """Seconds of each of ``steps`` jaxrl_llm GRPO steps on the benchmark batch (one device by default); the
    trainer's seconds per phase of each step are appended to ``phases`` when given."""
    trainer = benchmark_trainer(model_dir, run_dir, steps, extra, devices, micro_batch)
    times: list[float] = []
    try:
        for _ in range(steps):
            timed_step(trainer, times, phases)
    finally:
        trainer.close()
    return times


def timed_step(trainer: RLTrainer, times: list[float], phases: dict | None = None) -> None:
    """One step of ``trainer``: its seconds appended to ``times``, the trainer's seconds per phase to ``phases``."""
    t0 = time.perf_counter()
    metrics = trainer.train_step()
    times.append(time.perf_counter() - t0)
    if phases is not None:
        for k, v in metrics.items():
            if k.startswith("time_"):
                phases.setdefault(k[5:], []).append(v)


def time_trl(model_dir: str, out_dir: str, steps: int, after_step=None) -> list[float]:
    """Seconds of each of ``steps`` TRL GRPO steps on the benchmark batch; ``after_step(seconds)``, when given,
    runs after each step, outside its timing."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="float32")
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows(PROMPTS * (steps + 1))])

    def reward(prompts, completions, answer, **_):
        return [score_completion(c, a) for c, a in zip(completions, answer)]

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            if after_step is not None:
                after_step(times[-1])

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=PROMPTS * N, gradient_accumulation_steps=1,
                      num_generations=N, max_completion_length=NEW, temperature=1.0, learning_rate=1e-5,
                      max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                      bf16=False, beta=0.0, num_iterations=1, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return times


def compare_exact(steps: int) -> None:
    """Exact-mode steps against default steps, taking turns."""
    times = {"default": [], "exact": []}
    phases = {"default": {}, "exact": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir)
        trainers = {mode: benchmark_trainer(model_dir, os.path.join(tmp, mode), steps,
                                            ("mesh.data=1", f"rollout.consistency={mode}"))
                    for mode in times}
        try:
            for _ in range(steps):
                for mode, trainer in trainers.items():
                    time.sleep(PAUSE)
                    timed_step(trainer, times[mode], phases[mode])
        finally:
            for trainer in trainers.values():
                trainer.close()
    med = {m: statistics.median(t[WARMUP:]) for m, t in times.items()}
    rollout = {m: statistics.median([a + b for a, b in zip(p["rollout_reward"][WARMUP:], p["score"][WARMUP:])])
               for m, p in phases.items()}
    update = {m: statistics.median(p["update"][WARMUP:]) for m, p in phases.items()}
    print(f"batch: {PROMPTS} prompts x {N} samples, <= {PROMPT_LEN} prompt tokens, <= {NEW} new tokens, "
          f"CPU ({machine()})")
    for mode in times:
        print(f"{mode:8s} s/step: {med[mode]:.3f}, rollout + scoring {rollout[mode]:.3f}, update {update[mode]:.3f}  "
              f"(all steps: {np.round(times[mode], 3).tolist()})")
    print(f"exact/default: step {med['exact'] / med['default']:.2f}x, rollout + scoring "
          f"{rollout['exact'] / rollout['default']:.2f}x, update {update['exact'] / update['default']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--consistency", choices=("exact",), default=None,
                    help="compare exact-mode steps with default ones instead of with TRL")
    args = ap.parse_args()
    steps = max(args.steps, WARMUP + 1)
    if args.consistency:
        compare_exact(steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir)
        ours: list[float] = []
        phases: dict[str, list[float]] = {}
        trainer = benchmark_trainer(model_dir, os.path.join(tmp, "jaxrl"), steps)

        # TRL in a process of its own (see peers.py); after each of its steps, one of ours, with pauses as in
        # timing.median_times
        trl = Peer(trl_worker, model_dir, os.path.join(tmp, "trl"), steps)
        try:
            while True:
                kind, value = trl.recv()
                if kind == "done":
                    theirs = value
                    break
                time.sleep(PAUSE)
                timed_step(trainer, ours, phases)
                time.sleep(PAUSE)
                trl.conn.send(("continue",))
        finally:
            trl.close()
            trainer.close()
    a, b = statistics.median(ours[WARMUP:]), statistics.median(theirs[WARMUP:])
    print(f"batch: {PROMPTS} prompts x {N} samples, <= {PROMPT_LEN} prompt tokens, <= {NEW} new tokens, "
          f"CPU ({machine()})")
    print(f"jaxrl_llm  s/step: {a:.3f}  (all steps: {np.round(ours, 3).tolist()})")
    print("jaxrl_llm  phases (median s): " + ", ".join(f"{k} {statistics.median(v[WARMUP:]):.3f}"
                                                   for k, v in phases.items()))
    print(f"TRL GRPO   s/step: {b:.3f}  (all steps: {np.round(theirs, 3).tolist()})")
    print(f"speed-up jaxrl_llm vs TRL: {b / a:.2f}x")


if __name__ == "__main__":
    main()
