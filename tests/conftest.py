"""Test-wide setup: 8 fake CPU devices so sharding tests can build meshes.

XLA reads the flag when the backend starts, so it must be set before jax is imported anywhere.
Many tests compile the same programs (same tiny model and config, new trainer); a persistent compilation cache,
fresh for every test run and shared by its workers, compiles each of them once.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the process that starts the run makes the cache directory; pytest-xdist workers inherit it through the
# environment, and the starting process removes it at the end
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrl_llm_tests_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# session-wide: every module reads the same checkpoint, which takes seconds to build (its initialisers compile)
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3-style policy with the character tokenizer, saved as a Hugging Face checkpoint."""
    from flax import nnx

    from jaxrl_llm.models import Decoder, ModelConfig, save_hf
    from jaxrl_llm.tokenizer import build_char_tokenizer

    path = str(tmp_path_factory.mktemp("tiny"))
    tok = build_char_tokenizer()
    cfg = ModelConfig(model_type="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """:func:`tiny_model_dir` as a mixture-of-experts policy (Qwen3-MoE, 4 experts, 2 per token)."""
    from flax import nnx

    from jaxrl_llm.models import Decoder, ModelConfig, save_hf
    from jaxrl_llm.tokenizer import build_char_tokenizer

    path = str(tmp_path_factory.mktemp("tiny_moe"))
    tok = build_char_tokenizer()
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                      max_position_embeddings=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      moe_layers=(True, True), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path
