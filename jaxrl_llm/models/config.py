"""Model configuration: one dataclass for the Llama / Qwen2 / Qwen3 / Qwen3-MoE decoder family.

Built from (and converted back to) a Hugging Face ``transformers`` config. Options this implementation does
not support are rejected with an error naming them, never silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # llama3 rope scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # None = the family's layout: qkv_bias for qwen2; o_bias = attention_bias (llama, qwen3) ; qk_norm for qwen3
    qkv_bias: bool | None = None  # Qwen2 (and Llama/Qwen3 attention_bias)
    o_bias: bool | None = None  # Llama/Qwen3 attention_bias also covers o_proj; Qwen2 never has it
    qk_norm: bool | None = None  # Qwen3: RMSNorm over head_dim on queries and keys
    # Mixture of experts (Qwen3-MoE); moe_layers[i] says whether layer i is sparse (default for qwen3_moe: all)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # a list is stored as a tuple (the config is hashable)
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        qwen3 = self.model_type in ("qwen3", "qwen3_moe")
        fill = lambda name, value: object.__setattr__(self, name, value) if getattr(self, name) is None else None
        fill("qkv_bias", self.model_type == "qwen2")
        fill("o_bias", self.qkv_bias and self.model_type != "qwen2")
        fill("qk_norm", qwen3)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type == "qwen3_moe" and not self.moe_layers:
            object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
        # the saved checkpoint must mean the same model to transformers, so the layout must match the family
        if self.model_type == "qwen2" and not (self.qkv_bias and not self.o_bias):
            raise ValueError("qwen2 has q/k/v biases and no o_proj bias: qkv_bias=True, o_bias=False required, got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if self.model_type != "qwen2" and self.o_bias != self.qkv_bias:
            raise ValueError(f"{self.model_type}: attention_bias covers q/k/v and o together; got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if self.qk_norm != qwen3:
            raise ValueError(f"{self.model_type}: qk_norm must be {qwen3} (q/k RMSNorm is part of Qwen3 only), got "
                             f"{self.qk_norm}")
        if self.model_type != "qwen3_moe" and any(self.moe_layers):
            raise ValueError(f"moe_layers is only supported for qwen3_moe, not {self.model_type}")
        if self.rope_scaling is not None:
            keys = sorted(k for k, _ in self.rope_scaling)
            if keys != sorted(LLAMA3_ROPE_KEYS):
                raise ValueError(f"rope_scaling (llama3) needs exactly the keys {LLAMA3_ROPE_KEYS}, got {keys}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if any(self.moe_layers) and not (self.num_experts > 0 and 0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"MoE layers need num_experts > 0 and 0 < num_experts_per_tok <= num_experts, got "
                             f"{self.num_experts} and {self.num_experts_per_tok}")

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def layer_is_moe(self, i: int) -> bool:
        return bool(self.moe_layers[i]) if self.moe_layers else False

    @property
    def rope_scaling_dict(self) -> dict[str, float] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def num_params(self) -> int:
        """Parameter count (embedding and unembedding counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2 + (h + 2 * kv) * hd * self.qkv_bias + d * self.o_bias
        attn += 2 * hd * self.qk_norm
        total = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        for i in range(self.num_layers):
            if self.layer_is_moe(i):
                mlp = d * self.num_experts + self.num_experts * 3 * d * self.moe_intermediate_size
            else:
                mlp = 3 * d * self.intermediate_size
            total += attn + mlp + 2 * d
        return total

    # ---- Hugging Face conversion ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a ``transformers`` config object (``AutoConfig.from_pretrained(dir)``) or its dict."""
        c = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture model_type={model_type!r} "
                             f"(architectures={c.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
        if c.get("use_sliding_window"):
            raise ValueError("unsupported option use_sliding_window=True (sliding-window attention)")
        if c.get("mlp_bias"):
            raise ValueError("unsupported option mlp_bias=True")
        if c.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"unsupported option pretraining_tp={c.get('pretraining_tp')}")
        rope = c.get("rope_parameters") or {}
        legacy = c.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        scaling = None
        if rope_type == "llama3":
            src = rope if rope.get("rope_type") == "llama3" else legacy
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in src]
            if missing:
                raise ValueError(f"llama3 rope scaling is missing {missing}")
            scaling = tuple((k, float(src[k])) for k in LLAMA3_ROPE_KEYS)
        num_heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        head_dim = c.get("head_dim") or hidden // num_heads
        num_layers = int(c["num_hidden_layers"])
        attention_bias = bool(c.get("attention_bias", False))
        kwargs: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
            pad_token_id=c.get("pad_token_id"),
        )
        if model_type == "llama":
            kwargs.update(qkv_bias=attention_bias, o_bias=attention_bias)
        elif model_type == "qwen2":
            kwargs.update(qkv_bias=True)
        else:  # qwen3, qwen3_moe
            kwargs.update(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)
        if model_type == "qwen3_moe":
            num_experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
            step = int(c.get("decoder_sparse_step", 1) or 1)
            dense_only = set(c.get("mlp_only_layers") or [])
            moe_layers = tuple((i not in dense_only) and num_experts > 0 and (i + 1) % step == 0
                               for i in range(num_layers))
            kwargs.update(num_experts=num_experts, num_experts_per_tok=int(c["num_experts_per_tok"]),
                          moe_intermediate_size=int(c["moe_intermediate_size"]),
                          norm_topk_prob=bool(c.get("norm_topk_prob", False)), moe_layers=moe_layers)
        return cls(**kwargs)

    def to_hf(self):
        """The equivalent ``transformers`` config object."""
        import transformers

        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(rope_type="llama3", **self.rope_scaling_dict)
            rope_parameters["original_max_position_embeddings"] = int(
                rope_parameters["original_max_position_embeddings"])
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope_parameters, bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id, hidden_act="silu",
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        )
        if self.model_type == "llama":
            return transformers.LlamaConfig(attention_bias=self.qkv_bias, **common)
        if self.model_type == "qwen2":
            return transformers.Qwen2Config(**common)
        if self.model_type == "qwen3":
            return transformers.Qwen3Config(attention_bias=self.qkv_bias, **common)
        dense_only = [i for i, moe in enumerate(self.moe_layers) if not moe]
        return transformers.Qwen3MoeConfig(
            attention_bias=self.qkv_bias, num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
            decoder_sparse_step=1, mlp_only_layers=dense_only, **common)
