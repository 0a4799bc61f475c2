"""One GRPO step (a single update, two micro-batches) on a tiny dense / MoE Qwen3, float32 and bfloat16, on one
device and on a 2x2x2 mesh of CPU devices ((data, fsdp, tensor); (data, expert, tensor) for MoE), in exact mode and
in the default one: the largest gap between the
log-probs the loss differentiates and the sampler's (``train_sampler_abs_max``), and the first update's extreme
ratios (``ratio_min``, ``ratio_max``: exactly 1 when the gap is 0).

    python experiments/exact_gap.py
"""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxrl_llm.config import load_config  # noqa: E402
from jaxrl_llm.models import Decoder, ModelConfig, save_hf  # noqa: E402
from jaxrl_llm.tokenizer import build_char_tokenizer  # noqa: E402
from jaxrl_llm.trainer.rl import RLTrainer  # noqa: E402
from jaxrl_llm.tracking import read_jsonl  # noqa: E402


def model_dir(moe):
    path = tempfile.mkdtemp()
    tok = build_char_tokenizer()
    extra = (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe
             else dict(model_type="qwen3"))
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path


def run(moe, dtype, mesh, mode, extra=()):
    d = model_dir(moe)
    run_dir = tempfile.mkdtemp()
    ov = [f"model.path={d}", f"log.run_dir={run_dir}", "train.steps=1", "train.prompts_per_step=4",
          "rollout.n=4", "rollout.max_new_tokens=12", "train.micro_batch_size=8", "data.max_prompt_tokens=40",
          "data.task_kwargs={num_problems: 64, max_ops: 2}", "log.tensorboard=false", "log.progress=false",
          "checkpoint.async_save=false", "checkpoint.export_hf=false", f"rollout.consistency={mode}",
          f"model.dtype={dtype}", *mesh, *extra]
    t = RLTrainer(load_config(None, ov), devices=jax.devices() if mesh else jax.devices()[:1])
    try:
        t.train()
    finally:
        t.close()
    r = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))[-1]
    return {k: r[k] for k in ("train_sampler_abs_max", "ratio_min", "ratio_max")}


if __name__ == "__main__":
    for moe in (False, True):
        meshes = {"1dev": [], "2x2x2": ["mesh.data=2", "mesh.expert=2" if moe else "mesh.fsdp=2", "mesh.tensor=2"]}
        for dtype in ("float32", "bfloat16"):
            for name, mesh in meshes.items():
                for mode in ("exact", "default"):
                    gaps = run(moe, dtype, mesh, mode)
                    print(f"{'moe' if moe else 'dense':5} {dtype:8} {name:5} {mode:7} " +
                          " ".join(f"{k} {v:.9g}" for k, v in gaps.items()), flush=True)
