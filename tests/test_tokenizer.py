import pytest

from jaxrl_llm.tokenizer import EOS, build_char_tokenizer, load_tokenizer


def test_char_tokenizer_roundtrip_and_chat_template(tmp_path):
    build_char_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    text = "q=3,x=8,k=q*x,?k"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert len({tok.convert_tokens_to_ids(d) for d in "0123456789"}) == 10
    assert tok.eos_token == EOS and tok.pad_token_id == 0 and tok.padding_side == "left"
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(chat)["input_ids"]) == chat
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["attention_mask"][0] == [0, 0, 1, 1]


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
