"""Flax NNX decoders for the Llama / Qwen2 / Qwen3 / Qwen3-MoE family, with Hugging Face checkpoint I/O."""
from jaxrl_llm.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxrl_llm.models.decoder import ATTENTION_KERNELS, REMAT_POLICIES, Decoder, DecoderOutput, KVCache, init_cache
from jaxrl_llm.models.hf_io import load_config, load_hf, save_hf

__all__ = ["ATTENTION_KERNELS", "Decoder", "DecoderOutput", "KVCache", "ModelConfig", "REMAT_POLICIES",
           "SUPPORTED_MODEL_TYPES", "init_cache", "load_config", "load_hf", "save_hf", "left_pad_positions"]


def left_pad_positions(mask):
    """Positions for a left-padded batch: ``cumsum(mask) - 1`` clipped at 0 (pads get position 0)."""
    import jax.numpy as jnp

    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
