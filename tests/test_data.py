"""Data sources and the checkpointable prompt stream."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl_llm.data import PromptStream, from_generator, read_jsonl, read_parquet, tokenize_prompts
from jaxrl_llm.tokenizer import build_char_tokenizer

ROWS = [{"question": f"q{i}", "answer": i, "level": i % 3} for i in range(20)]


def test_jsonl_parquet_generator_sources(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    rows = read_jsonl(str(path), prompt_key="question")
    assert rows[3]["prompt"] == "q3" and rows[3]["answer"] == "3" and rows[3]["level"] == 0
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert read_parquet(str(tmp_path / "d.parquet"), prompt_key="question") == rows

    def gen():
        i = 0
        while True:
            yield {"prompt": f"p{i}", "answer": i}
            i += 1

    assert [r["prompt"] for r in from_generator(gen, 3)] == ["p0", "p1", "p2"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_jsonl(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="no 'prompt' column"):
        read_jsonl(str(path))
    with pytest.raises(FileNotFoundError):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_stream_is_seeded_and_resumes_exactly():
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]
    a = PromptStream(rows, 3, seed=1)
    b = PromptStream(rows, 3, seed=1)
    c = PromptStream(rows, 3, seed=2)
    first = [a.next_batch() for _ in range(2)]
    assert first == [b.next_batch() for _ in range(2)]
    assert first != [c.next_batch() for _ in range(2)]
    state = a.get_state()
    later = [a.next_batch() for _ in range(5)]  # crosses an epoch boundary
    fresh = PromptStream(rows, 3, seed=1)
    fresh.set_state(state)
    assert [fresh.next_batch() for _ in range(5)] == later
    # one epoch covers every row once
    stream = PromptStream(rows, 5, seed=0)
    epoch = [r["prompt"] for r in stream.next_batch() + stream.next_batch()]
    assert sorted(epoch) == sorted(r["prompt"] for r in rows)


def test_partial_reads_are_slices_of_the_global_batch():
    rows = [{"prompt": f"p{i}", "answer": ""} for i in range(12)]
    full = [PromptStream(rows, 4, seed=3).next_batch() for _ in range(1)][0]
    shares = []
    for positions in ([0, 1], [2, 3], [3]):  # e.g. what two processes' devices hold (and an overlap)
        stream = PromptStream(rows, 4, seed=3)
        shares.append(stream.next_batch(positions))
        assert shares[-1] == [full[i] for i in positions]
    # the stream moves one global batch per call whatever was read
    stream = PromptStream(rows, 4, seed=3)
    stream.next_batch([0])
    assert stream.next_batch() == PromptStream(rows, 8, seed=3).next_batch()[4:]
    with pytest.raises(IndexError, match="outside a batch of 4"):
        stream.next_batch([4])
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], 2)


def test_tokenize_prompts_left_pads_and_rejects_long(tmp_path):
    tok = build_char_tokenizer(str(tmp_path))
    ids, mask = tokenize_prompts(tok, ["ab", "abcd"], 6)
    assert mask.tolist() == [[False] * 4 + [True] * 2, [False] * 2 + [True] * 4]
    assert tok.decode(ids[1][mask[1]]) == "abcd"
    with pytest.raises(ValueError, match="prompt 1 has 4 tokens, more than data.max_prompt_tokens=3"):
        tokenize_prompts(tok, ["ab", "abcd"], 3)
    ids, mask = tokenize_prompts(tok, ["hi"], 40, chat_template=True)
    assert tok.decode(ids[0][mask[0]]).endswith("<|im_start|>assistant\n")
    assert np.asarray(ids).dtype == np.int32
