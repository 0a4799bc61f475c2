"""Tiny random Hugging Face configs and checkpoints for model tests (nothing is downloaded)."""
from __future__ import annotations

import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")


def tiny_hf_config(family: str, **overrides):
    import transformers

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)
    common.update(overrides)
    if family == "llama":
        common.setdefault("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16})
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "qwen3_moe":
        common.setdefault("num_experts", 4)
        common.setdefault("num_experts_per_tok", 2)
        common.setdefault("moe_intermediate_size", 24)
        common.setdefault("norm_topk_prob", True)
        return transformers.Qwen3MoeConfig(**common)
    raise ValueError(family)


def random_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with random weights (biases and norms randomised too, so they are tested)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides),
                                                          dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or "experts" in name or name.endswith("gate.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(vocab: int, lengths=(7, 4, 9), seed: int = 0):
    """Left-padded batch of uneven prompts: (ids [B, T], mask [B, T]) as numpy."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = rng.integers(1, vocab, n)
        mask[i, t - n:] = True
    return ids, mask


def hf_logits(model, ids, mask):
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


# the name other tests import
tiny_config = tiny_hf_config


def hf_checkpoint_dir(path, family: str, seed: int = 0, **overrides):
    """Write a random tiny transformers checkpoint (config.json + model.safetensors) into ``path``.

    Returns the PyTorch model, so tests can compare against it.
    """
    model = random_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(str(path))
    return model


def hf_outputs(model, ids, mask):
    """transformers outputs (hidden states of every layer, router logits for MoE) on a left-padded batch."""
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    kwargs = {"output_router_logits": True} if model.config.model_type == "qwen3_moe" else {}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                     position_ids=torch.tensor(pos, dtype=torch.long), output_hidden_states=True, **kwargs)
