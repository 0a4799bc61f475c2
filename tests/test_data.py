"""Data sources, the checkpointable prompt stream, prompt validation and truncation."""
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from jaxrl_llm.config import load_config
from jaxrl_llm.data import (JsonlSource, ParquetSource, PromptEncoder, PromptRows, PromptStream, from_generator,
                            load_rows, prepare_prompts, read_jsonl, read_parquet, split_holdout, tokenize_prompts)
from jaxrl_llm.data import sources as S
from jaxrl_llm.tokenizer import build_char_tokenizer

ROWS = [{"question": f"q{i}", "answer": i, "level": i % 3} for i in range(20)]


def _write_jsonl(path, rows, blank_every=0):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _data_cfg(*overrides):
    return load_config(None, ["model.path=unused", *overrides]).data


def test_jsonl_parquet_generator_sources(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
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
    with pytest.raises(ValueError, match=r"d.jsonl:1: row has no 'prompt' column"):
        read_jsonl(str(path))
    with pytest.raises(FileNotFoundError):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_random_access_matches_the_file_in_every_format(tmp_path):
    """Row i read by index is line i of the file (blank lines skipped), for jsonl, jsonl.gz, Parquet with small and
    with large row groups (rewritten into the cache), directories, globs, saved datasets and memory:// URIs."""
    rows = [{"prompt": f"p{i} " + "x" * (i % 7), "answer": str(i), "k": i} for i in range(10_000)]
    _write_jsonl(tmp_path / "a.jsonl", rows, blank_every=97)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write((tmp_path / "a.jsonl").read_text())
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "small_groups.parquet", row_group_size=700)
    pq.write_table(table, tmp_path / "one_group.parquet")  # one group of 10000 rows > MAX_GROUP_ROWS
    cache = str(tmp_path / "cache")
    sources = {"jsonl": JsonlSource(str(tmp_path / "a.jsonl")),
               "gz": JsonlSource(str(tmp_path / "a.jsonl.gz"), cache=cache),
               "parquet": ParquetSource(str(tmp_path / "small_groups.parquet")),
               "rewritten": ParquetSource(str(tmp_path / "one_group.parquet"), cache=cache)}
    assert pq.ParquetFile(sources["rewritten"]._read_path).metadata.num_row_groups == -(-10_000 // S.GROUP_ROWS)
    import fsspec

    with fsspec.open("memory://bucket/data/a.jsonl", "wb") as f:
        f.write((tmp_path / "a.jsonl").read_bytes())
    sources["memory"] = JsonlSource("memory://bucket/data/a.jsonl")
    rng = np.random.default_rng(0)
    for name, src in sources.items():
        assert len(src) == len(rows), name
        for i in rng.integers(0, len(rows), 200):
            assert src[int(i)] == rows[int(i)], (name, i)
        assert [r for _, r in src.iter_rows()] == rows, name
    # the line named for a row counts the blank lines before it (row 200 is on line 203: blank lines after 97, 194)
    assert sources["jsonl"].where(200) == f"{tmp_path / 'a.jsonl'}:203"
    # a directory of files, in name order, and a glob
    part = tmp_path / "parts"
    part.mkdir()
    _write_jsonl(part / "1.jsonl", rows[:3])
    _write_jsonl(part / "2.jsonl", rows[3:5])
    (part / "notes.txt").write_text("not data")
    d = load_rows(_data_cfg("data.source=jsonl", f"data.path={part}"))
    assert len(d) == 5 and d[4]["k"] == 4 and d.where(3) == f"{part / '2.jsonl'}:1"
    g = load_rows(_data_cfg("data.source=jsonl", f"data.path={part}/*.jsonl"))
    assert [r["k"] for _, r in g.iter_rows()] == [0, 1, 2, 3, 4]


def test_saved_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(30)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:4])}).save_to_disk(str(tmp_path / "ds"))
    src = load_rows(_data_cfg("data.source=hf_disk", f"data.path={tmp_path / 'ds'}"))
    assert len(src) == 30 and src[17]["prompt"] == "p17" and src.where(17).endswith("[train] row 17")
    test = load_rows(_data_cfg("data.source=hf_disk", f"data.path={tmp_path / 'ds'}", "data.split=test"))
    assert [r["prompt"] for _, r in test.iter_rows()] == ["p0", "p1", "p2", "p3"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_rows(_data_cfg("data.source=hf_disk", f"data.path={tmp_path / 'ds'}", "data.split=dev"))


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


@settings(max_examples=15, deadline=None)
@given(size=st.integers(1, 40), batch=st.integers(1, 9), seed=st.integers(0, 2 ** 31), threads=st.integers(1, 4),
       prefetch=st.integers(0, 3))
def test_prefetching_threads_give_the_order_of_direct_reads(size, batch, seed, threads, prefetch):
    rows = [{"prompt": str(i)} for i in range(size)]
    direct = PromptStream(rows, batch, seed=seed, prefetch=0)
    ahead = PromptStream(rows, batch, seed=seed, read_threads=threads, prefetch=prefetch)
    expected = [direct.next_batch() for _ in range(6)]
    assert [ahead.next_batch() for _ in range(6)] == expected
    # every epoch is a permutation of the rows
    epochs = -(-6 * batch // size)
    flat = [int(r["prompt"]) for b in expected for r in b][: (6 * batch // size) * size]
    for e in range(len(flat) // size):
        assert sorted(flat[e * size:(e + 1) * size]) == list(range(size))
    assert epochs >= 1
    ahead.close()


def test_partial_reads_are_slices_of_the_global_batch():
    rows = [{"prompt": f"p{i}", "answer": ""} for i in range(12)]
    full = [PromptStream(rows, 4, seed=3).next_batch() for _ in range(1)][0]
    shares = []
    for positions in ([0, 1], [2, 3], [3]):  # e.g. what two processes' devices hold (and an overlap)
        stream = PromptStream(rows, 4, seed=3)
        shares.append(stream.next_batch(positions))
        assert shares[-1] == [full[i] for i in positions]
    # the stream moves one global batch per call whatever was read, and a change of positions is honoured
    stream = PromptStream(rows, 4, seed=3)
    stream.next_batch([0])
    assert stream.next_batch() == PromptStream(rows, 8, seed=3).next_batch()[4:]
    assert stream.next_batch([1, 2]) == PromptStream(rows, 12, seed=3).next_batch()[9:11]
    with pytest.raises(IndexError, match="outside a batch of 4"):
        stream.next_batch([4])
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], 2)


def test_tokenize_prompts_left_pads_and_rejects_long(tmp_path):
    tok = build_char_tokenizer(str(tmp_path))
    ids, mask = tokenize_prompts(tok, ["ab", "abcd"], 6)
    assert mask.tolist() == [[False] * 4 + [True] * 2, [False] * 2 + [True] * 4]
    assert tok.decode(ids[1][mask[1]]) == "abcd"
    with pytest.raises(ValueError, match="prompt 1 .* has 4 tokens, more than data.max_prompt_tokens=3"):
        tokenize_prompts(tok, ["ab", "abcd"], 3)
    ids, mask = tokenize_prompts(tok, ["hi"], 40, chat_template=True)
    assert tok.decode(ids[0][mask[0]]).endswith("<|im_start|>assistant\n")
    assert np.asarray(ids).dtype == np.int32
    # truncation: left keeps the end, right the start
    ids, mask = tokenize_prompts(tok, ["abcdef"], 4, truncate="left")
    assert tok.decode(ids[0][mask[0]]) == "cdef" and mask[0].all()
    ids, mask = tokenize_prompts(tok, ["abcdef", "xy"], 4, truncate="right")
    assert tok.decode(ids[0][mask[0]]) == "abcd" and tok.decode(ids[1][mask[1]]) == "xy"


def test_every_prompt_is_checked_at_start_naming_file_and_line(tmp_path):
    tok = build_char_tokenizer()
    rows = [{"prompt": "short " + "x" * (i % 5), "answer": "1"} for i in range(30)]
    rows[11]["prompt"] = "y" * 302  # the 12th row: line 12
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"p\.jsonl:12: prompt has 302 tokens, more than data\.max_prompt_tokens=64"):
        prepare_prompts(_data_cfg("data.source=jsonl", f"data.path={path}", "data.max_prompt_tokens=64"), tok)
    # null (the default): the longest prompt, rounded up to 16
    _, encoder, scan = prepare_prompts(_data_cfg("data.source=jsonl", f"data.path={path}"), tok)
    assert (scan.longest, scan.longest_where, scan.rows) == (302, f"{path}:12", 30)
    assert encoder.max_tokens == 304
    # an explicit truncation policy counts what it cuts
    _, encoder, scan = prepare_prompts(_data_cfg("data.source=jsonl", f"data.path={path}", "data.max_prompt_tokens=64",
                                                 "data.truncate=left"), tok)
    assert scan.truncated == 1 and encoder.max_tokens == 64
    # bad rows anywhere in the file are found at start, with their line
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare_prompts(_data_cfg("data.source=jsonl", f"data.path={tmp_path / 'bad.jsonl'}"), tok)
    (tmp_path / "empty_prompt.jsonl").write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"empty_prompt\.jsonl:2: the prompt is empty"):
        prepare_prompts(_data_cfg("data.source=jsonl", f"data.path={tmp_path / 'empty_prompt.jsonl'}"), tok)


def test_gzipped_jsonl_trains_on_what_it_holds(tmp_path):
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(50)]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _data_cfg("data.source=jsonl", f"data.path={tmp_path / 'p.jsonl.gz'}", f"data.cache_dir={tmp_path / 'c'}")
    src, encoder, scan = prepare_prompts(cfg, build_char_tokenizer())
    stream = PromptStream(src, 8, seed=0)
    seen = [r["prompt"] for _ in range(7) for r in stream.next_batch()]
    assert sorted(seen[:50]) == sorted(r["prompt"] for r in rows) and scan.longest == len("49+49=")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        JsonlSource(str(tmp_path / "broken.jsonl.gz"), cache=str(tmp_path / "c"))


def test_holdout_split_is_disjoint_and_covers_the_rows():
    rows = PromptRows(S.ListSource([{"prompt": str(i)} for i in range(100)]))
    train, held = split_holdout(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    ids = sorted(int(r["prompt"]) for r in list(train) + list(held))
    assert ids == list(range(100))
    assert [r["prompt"] for r in split_holdout(rows, 0.1, seed=3)[1]] == [r["prompt"] for r in held]
    assert len(split_holdout(rows, 7, seed=0)[1]) == 7
    with pytest.raises(ValueError, match="eval.split"):
        split_holdout(rows, 100)


def test_messages_rows_and_their_errors():
    from jaxrl_llm.data import normalize_row

    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    row = normalize_row({"messages": turns, "answer": 3}, "f:1")
    assert row["prompt"] == "q" and row["prompt_messages"] == turns and row["answer"] == "3"
    # a list in the prompt column is a conversation too; a prompt column wins over messages
    assert normalize_row({"prompt": turns}, "f:1")["prompt_messages"] == turns
    assert "prompt_messages" not in normalize_row({"prompt": "p", "messages": turns}, "f:1")
    with pytest.raises(ValueError, match=r"f:2: the last turn must be the user's"):
        normalize_row({"messages": turns + [{"role": "assistant", "content": "a"}]}, "f:2")
    with pytest.raises(ValueError, match=r"f:3: turn 0 has role 'tool'"):
        normalize_row({"messages": [{"role": "tool", "content": "x"}]}, "f:3")
    with pytest.raises(ValueError, match=r"f:4: row has no 'prompt' column \(nor 'messages'"):
        normalize_row({"question": "x"}, "f:4")


def test_encoder_without_a_chat_template_is_an_error():
    tok = build_char_tokenizer()
    tok.chat_template = None
    enc = PromptEncoder(tok, max_tokens=8)
    with pytest.raises(ValueError, match="data.chat_template: the tokenizer has no chat template"):
        enc.encode([{"prompt": "q", "prompt_messages": [{"role": "user", "content": "q"}]}])
