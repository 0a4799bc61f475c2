"""Small tokenizers built locally with the `tokenizers` library and saved in Hugging Face format.

``build_char_tokenizer`` makes a character-level tokenizer (every digit its own token, which small models need
for arithmetic) with ChatML special tokens and a chat template, loadable with ``AutoTokenizer.from_pretrained``.
"""
from __future__ import annotations

import os
import string

__all__ = ["build_char_tokenizer", "load_tokenizer", "SPECIAL_TOKENS", "CHAT_TEMPLATE"]

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, EOS, IM_START, IM_END)
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " =+-*/,.?#:;()[]<>!_'\"\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer(out_dir: str | None = None, *, chars: str = CHARS, model_max_length: int = 1024):
    """A character-level ``PreTrainedTokenizerFast`` (specials first: pad = 0, eos = 1); saved if ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars):
        raise ValueError("chars must not repeat")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    unk = "?" if "?" in vocab else chars[0]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=unk,
                                   model_max_length=model_max_length, padding_side="left",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str, *, cache_dir: str | None = None):
    """``AutoTokenizer.from_pretrained`` on a checkpoint directory, with a clear error when it holds no tokenizer.
    A URI directory is mirrored into the local model cache first (:func:`jaxrl_llm.paths.local_copy`)."""
    from transformers import AutoTokenizer

    from jaxrl_llm import paths

    if paths.is_uri(path) and paths.isdir(path):
        path = paths.local_copy(path, cache=cache_dir)
    if not os.path.isdir(path) or not any(
            os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return tok
