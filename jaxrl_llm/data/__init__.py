"""Prompt data: file-backed grain sources, chat rendering, validation and the checkpointable prompt stream.

    sources.py   random-access rows of JSON lines (.gz too), Parquet, datasets' save_to_disk, directories of files
    rows.py      raw columns -> prompt rows (prompt or chat turns, answer); held-out subsets
    prompts.py   chat template, tokenisation, padding, truncation; the pass over every prompt at start
    stream.py    PromptStream: seeded global shuffle, per-process reads, prefetch threads, position in checkpoints
    loading.py   config section -> all of the above

Nothing requires the data set to fit in memory: rows are read by index through an index built once per file.
"""
from jaxrl_llm.data.loading import (TrainingPrompts, from_generator, load_rows, prepare_prompts, read_jsonl,
                                    read_parquet, training_prompts)
from jaxrl_llm.data.prompts import PromptEncoder, PromptScan, round_up, scan_prompts, tokenize_prompts
from jaxrl_llm.data.rows import PromptRows, Subset, normalize_row, split_holdout
from jaxrl_llm.data.sources import (ConcatSource, HFDiskSource, JsonlSource, ListSource, ParquetSource, data_files,
                                    open_file_source)
from jaxrl_llm.data.stream import PromptStream

__all__ = ["read_jsonl", "read_parquet", "from_generator", "PromptStream", "tokenize_prompts", "load_rows",
           "prepare_prompts", "training_prompts", "TrainingPrompts", "PromptEncoder", "PromptScan", "scan_prompts",
           "round_up", "PromptRows", "Subset", "normalize_row", "split_holdout", "JsonlSource", "ParquetSource",
           "HFDiskSource", "ListSource", "ConcatSource", "data_files", "open_file_source"]
