"""Prompt data streamed from a Parquet file by index vs the same file loaded into memory.

A generated Parquet file of 100,000 prompt rows (about 1 KB of text each, written with pyarrow's default of one
row group for the whole file) is read in two ways, each in a process of its own so that its peak resident memory
is its own:

* **in memory**: ``pq.read_table(path).to_pylist()``, then batches through a grain-shuffled list (how the data
  module read files before it streamed them);
* **streamed**: ``jaxrl_llm.data.prepare_prompts`` (opening the file, rewriting its one large row group into
  row groups of 256 rows in the local data cache, and tokenising every prompt once to validate it and measure
  the longest) and a ``PromptStream`` with prefetch threads, shuffled over the whole file.

Both then hand out the same number of batches. Reported: file size, peak RSS (the process's high-water mark,
``VmHWM``) above its resident size after imports, seconds (for the streamed mode split into opening, the
validation pass and the batches), and the ratio of the two peaks. The validation pass tokenises 100 M characters
with the character tokenizer of the main job, which is slow (a real BPE tokenizer is faster per character).

    python benchmarks/data_stream.py [--rows 100000] [--batches 200] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc (``VmHWM``: peak resident size, ``VmRSS``: current). Unlike
    ``ru_maxrss``, the peak starts afresh in a new program, not at the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_file(path: str, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
    text = letters[rng.integers(0, len(letters), rows * 1000)].tobytes().decode()
    prompts = [f"problem {i}: " + text[i * 1000:(i + 1) * 1000] for i in range(rows)]
    pq.write_table(pa.table({"prompt": prompts, "answer": [str(i) for i in range(rows)]}), path)


def run_mode(mode: str, path: str, batches: int, batch: int, cache: str) -> dict:
    import grain
    import pyarrow.parquet as pq

    from jaxrl_llm.config import load_config
    from jaxrl_llm.data import PromptStream
    from jaxrl_llm.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    base = _status_mb("VmRSS")
    times, peaks = {}, {}  # seconds of each part; peak RSS above the baseline once each part is done
    t0 = time.perf_counter()
    if mode == "memory":
        rows = pq.read_table(path).to_pylist()
        ds = grain.MapDataset.source(rows).shuffle(seed=0).repeat()
        seen = [ds[b * batch + i]["prompt"] for b in range(batches) for i in range(batch)]
    else:
        from jaxrl_llm.data import load_rows, scan_prompts, PromptEncoder

        cfg = load_config(None, ["model.path=unused", "data.source=parquet", f"data.path={path}",
                                 f"data.cache_dir={cache}"]).data
        rows = load_rows(cfg)  # prepare_prompts, in its two parts, timed apart
        times["open"] = time.perf_counter() - t0
        peaks["open"] = _status_mb("VmHWM") - base
        t1 = time.perf_counter()
        scan = scan_prompts(rows.iter_rows(), PromptEncoder.of(tok, cfg))
        times["validate"] = time.perf_counter() - t1
        peaks["validate"] = _status_mb("VmHWM") - base
        t2 = time.perf_counter()
        stream = PromptStream(rows, batch, seed=0, read_threads=8, prefetch=2)
        seen = [r["prompt"] for _ in range(batches) for r in stream.next_batch()]
        stream.close()
        rows.close()
        times["batches"] = time.perf_counter() - t2
        assert scan.rows == len(rows)
    seconds = time.perf_counter() - t0
    assert len(seen) == batches * batch
    return {"mode": mode, "peak_rss_mb": _status_mb("VmHWM") - base, "seconds": seconds, "parts": times,
            "peaks": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mode", choices=("memory", "stream"))
    parser.add_argument("--path")
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.path, args.batches, args.batch, args.cache)))
        return
    from timing import machine

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.parquet")
        make_file(path, args.rows)
        size_mb = os.path.getsize(path) / 2 ** 20
        results = {}
        for mode in ("stream", "memory"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--path", path, "--batches",
                                  str(args.batches), "--batch", str(args.batch), "--cache", os.path.join(tmp, "c")],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"the {mode} process failed ({out.returncode}):\n{out.stderr[-3000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {machine()}")
    print(f"file: {args.rows} rows, {size_mb:.1f} MB Parquet (one row group); {args.batches} batches of {args.batch}")
    for mode in ("memory", "stream"):
        r = results[mode]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["parts"].items())
        print(f"{mode:>7}: peak RSS +{r['peak_rss_mb']:.1f} MB, {r['seconds']:.1f} s" + (f" ({parts})" if parts else ""))
        if r["peaks"]:
            print("         peak RSS after " + ", ".join(f"{k} +{v:.1f} MB" for k, v in r["peaks"].items()))
    ratio = results["memory"]["peak_rss_mb"] / max(results["stream"]["peak_rss_mb"], 1e-9)
    print(f"peak RSS, in memory / streamed: {ratio:.1f}x")


if __name__ == "__main__":
    main()
