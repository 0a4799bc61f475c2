"""Chat prompts: messages rows, a system prompt and chat-template arguments, rendered as a Qwen3-style template says."""
import json

import pytest

from jaxrl_llm.config import ConfigError, load_config
from jaxrl_llm.data import PromptStream, prepare_prompts
from jaxrl_llm.tokenizer import build_char_tokenizer, load_tokenizer

# Qwen3's layout: a system turn first if any, ChatML turns, and with enable_thinking=false an empty think block
# after the generation prompt
QWEN3_STYLE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen3_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3tok")
    tok = build_char_tokenizer()
    tok.chat_template = QWEN3_STYLE
    tok.save_pretrained(str(path))
    return str(path), load_tokenizer(str(path))


def _data(path, *extra):
    return load_config(None, ["model.path=unused", "data.source=jsonl", f"data.path={path}", *extra]).data


def test_system_prompt_turns_and_template_kwargs_render_as_the_template_says(qwen3_tokenizer, tmp_path):
    _, tok = qwen3_tokenizer
    rows = [
        {"prompt": "what is 2+3?", "answer": "5"},
        {"messages": [{"role": "user", "content": "add 1 and 1"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "and 2 and 2?"}], "answer": "4"},
        {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "7*6?"}],
         "answer": "42"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _data(path, "data.chat_template=true", "data.system_prompt='You solve sums.'",
                "data.chat_template_kwargs={enable_thinking: false}")
    source, encoder, scan = prepare_prompts(cfg, tok)
    system = {"role": "system", "content": "You solve sums."}
    expected_turns = [
        [system, {"role": "user", "content": "what is 2+3?"}],
        [system] + rows[1]["messages"],
        rows[2]["messages"],  # has its own system turn: the configured one is not added
    ]
    for i, turns in enumerate(expected_turns):
        reference = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert encoder.render(source[i]) == reference
    # the text, exactly, for the first row
    assert encoder.render(source[0]) == ("<|im_start|>system\nYou solve sums.<|im_end|>\n"
                                         "<|im_start|>user\nwhat is 2+3?<|im_end|>\n"
                                         "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the token ids the sampler gets are those of that text, left-padded to the derived length
    ids, mask = encoder.encode([source[i] for i in range(3)])
    for i in range(3):
        reference = tok.apply_chat_template(expected_turns[i], tokenize=False, add_generation_prompt=True,
                                            enable_thinking=False)
        assert ids[i][mask[i]].tolist() == tok(reference, add_special_tokens=False)["input_ids"]
    assert encoder.max_tokens == -(-scan.longest // 16) * 16
    # reward functions see the last user turn as the prompt
    assert [source[i]["prompt"] for i in range(3)] == ["what is 2+3?", "and 2 and 2?", "7*6?"]
    # thinking left on: no empty think block
    _, plain, _ = prepare_prompts(_data(path, "data.chat_template=true"), tok)
    assert plain.render(source[0]) == "<|im_start|>user\nwhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert [r["answer"] for r in PromptStream(source, 3, shuffle=False).next_batch()] == ["5", "4", "42"]


def test_chat_options_need_the_chat_template(tmp_path):
    with pytest.raises(ConfigError, match="data.system_prompt: is a turn of the chat template"):
        load_config(None, ["model.path=x", "data.system_prompt=hi"])
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: are arguments of the chat template"):
        load_config(None, ["model.path=x", "data.chat_template_kwargs={enable_thinking: false}"])
    with pytest.raises(ConfigError, match="data.truncate: got 'middle'"):
        load_config(None, ["model.path=x", "data.truncate=middle"])
    with pytest.raises(ConfigError, match="data.max_prompt_tokens: must be given when data.validate=false"):
        load_config(None, ["model.path=x", "data.validate=false"])
