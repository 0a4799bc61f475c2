"""Random-access row sources over files that need not fit in memory.

A source is a sequence of raw row dicts (``len(source)``, ``source[i]``) plus

* ``where(i)``: where row ``i`` lives, for error messages (``file:line`` for JSON lines, ``file row r`` for
  Parquet and saved datasets);
* ``iter_rows()``: every row in order as ``(where, row)``, read sequentially (the cheap way to look at all of
  them once, e.g. to validate every prompt at start).

Random access goes through an index built once when the source is opened:

* JSON lines: the byte offset of every non-empty line (8 bytes per row); a row is a seek and a ``readline``.
  ``.gz`` files cannot be seeked into, so they are first decompressed, streaming, into the local data cache.
* Parquet: the row counts of the row groups; a row is read from its decoded row group, a few of which are kept
  (least recently used). Files whose row groups are larger than ``MAX_GROUP_ROWS`` rows are first rewritten,
  streaming, into the local data cache with row groups of ``GROUP_ROWS`` rows, so that one row never costs
  decoding a whole large file.
* ``datasets.save_to_disk`` directories: Arrow files memory-mapped by the ``datasets`` library (an optional
  dependency, imported only for this source).

Files are local paths or URIs (:mod:`jaxrl_llm.paths`); every reading thread has its own file handle.
"""
from __future__ import annotations

import bisect
import collections
import gzip
import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from jaxrl_llm import paths

__all__ = ["JsonlSource", "ParquetSource", "HFDiskSource", "ListSource", "ConcatSource", "data_files",
           "open_file_source", "FILE_SUFFIXES", "GROUP_ROWS", "MAX_GROUP_ROWS"]

FILE_SUFFIXES = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"), "parquet": (".parquet", ".pq")}
GROUP_ROWS = 256  # rows per row group of a rewritten Parquet file
MAX_GROUP_ROWS = 2048  # larger row groups are rewritten first
_CACHED_GROUPS = 4  # decoded row groups kept per Parquet file


class _Handles:
    """One open binary file per reading thread (file objects are not safe to share between threads)."""

    def __init__(self, path: str, opener=None):
        self.path = path
        self._opener = opener or (lambda p: paths.open(p, "rb"))
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def get(self):
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self._opener(self.path)
            with self._lock:
                self._all.append(handle)
        return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._all:
                handle.close()
            self._all.clear()
        self._local = threading.local()


def _cached_copy(path: str, suffix: str, cache: str | None, write) -> str:
    """A local file in the data cache derived from ``path`` (keyed by its name and size), made once by
    ``write(tmp_path)`` and renamed into place (several processes may race; each writes its own temporary)."""
    key = paths.cache_key(f"{path}|{paths.size(path)}|{suffix}")
    target = os.path.join(paths.cache_dir("data", cache), key + suffix)
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp.{os.getpid()}"
        write(tmp)
        os.replace(tmp, target)
    return target


def _parse_json(line: bytes, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return row


class _FileSource:
    """A source over one data file: ``path`` as given and ``_read_path``, the file read (a copy in the local data
    cache when the file needs converting first), through the per-thread handles ``_handles`` of a subclass."""

    _handles: _Handles

    def __init__(self, path: str):
        if not paths.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        self.path = path
        self._read_path = path

    def close(self) -> None:
        self._handles.close()


class JsonlSource(_FileSource):
    """The rows of one JSON-lines file (``.jsonl``, ``.json``, or gzip-compressed ``.gz``)."""

    def __init__(self, path: str, *, cache: str | None = None):
        super().__init__(path)
        if path.lower().endswith(".gz"):
            def decompress(tmp: str) -> None:
                with paths.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as src, open(tmp, "wb") as out:
                    try:
                        shutil.copyfileobj(src, out, 1 << 22)
                    except (OSError, EOFError) as err:
                        raise ValueError(f"{path}: not a readable gzip file ({err})") from None

            self._read_path = _cached_copy(path, ".jsonl", cache, decompress)
        self._offsets = self._index()
        self._handles = _Handles(self._read_path)

    def _index(self) -> np.ndarray:
        offsets, pos = [], 0
        with paths.open(self._read_path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        return np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> dict:
        f = self._handles.get()
        f.seek(int(self._offsets[i]))
        return _parse_json(f.readline(), self.where(i))

    def where(self, i: int) -> str:
        """``file:line`` (1-based line; blank lines count, as in an editor)."""
        end = int(self._offsets[i])
        with paths.open(self._read_path, "rb") as f:
            lines = 1
            while end > 0:
                chunk = f.read(min(end, 1 << 22))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                end -= len(chunk)
        return f"{self.path}:{lines}"

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        with paths.open(self._read_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{self.path}:{lineno}"
                    yield where, _parse_json(line, where)


def _parquet_file(handle):
    import pyarrow.parquet as pq

    # buffered, page-by-page reading: a large column chunk is not read into memory whole
    return pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False)


class ParquetSource(_FileSource):
    """The rows of one Parquet file, read by row group."""

    def __init__(self, path: str, *, cache: str | None = None):
        super().__init__(path)
        with paths.open(path, "rb") as f:
            meta = _parquet_file(f).metadata
            counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        if counts and max(counts) > MAX_GROUP_ROWS:
            self._read_path = _cached_copy(path, ".parquet", cache, self._rewrite)
            with open(self._read_path, "rb") as f:
                meta = _parquet_file(f).metadata
                counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._handles = _Handles(self._read_path, lambda p: _parquet_file(paths.open(p, "rb")))
        self._groups: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _rewrite(self, tmp: str) -> None:
        import pyarrow.parquet as pq

        with paths.open(self.path, "rb") as f:
            src = _parquet_file(f)
            with pq.ParquetWriter(tmp, src.schema_arrow) as out:
                for batch in src.iter_batches(batch_size=GROUP_ROWS):
                    out.write_batch(batch, row_group_size=GROUP_ROWS)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _group(self, g: int):
        with self._lock:
            table = self._groups.get(g)
            if table is not None:
                self._groups.move_to_end(g)
                return table
        table = self._handles.get().read_row_group(g)
        with self._lock:
            self._groups[g] = table
            while len(self._groups) > _CACHED_GROUPS:
                self._groups.popitem(last=False)
        return table

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {self.path} (it has {len(self)})")
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._group(g).slice(i - int(self._starts[g]), 1).to_pylist()[0]

    def where(self, i: int) -> str:
        return f"{self.path} row {i}"

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        with paths.open(self._read_path, "rb") as f:
            i = 0
            for batch in _parquet_file(f).iter_batches(batch_size=GROUP_ROWS):
                for row in batch.to_pylist():
                    yield f"{self.path} row {i}", row
                    i += 1


class HFDiskSource:
    """A dataset written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``: its ``split``)."""

    def __init__(self, path: str, *, split: str = "train"):
        try:
            import datasets
        except ImportError:
            raise ImportError("data.source=hf_disk needs the datasets package: pip install 'jaxrl_llm[datasets]'") \
                from None
        if not paths.isdir(path):
            raise FileNotFoundError(f"data directory not found: {path}")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} in the saved DatasetDict (splits: {sorted(ds)}); "
                                 "set data.split")
            ds = ds[split]
            self.path = f"{path} [{split}]"
        else:
            self.path = path
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        return dict(self._ds[int(i)])

    def where(self, i: int) -> str:
        return f"{self.path} row {i}"

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        i = 0
        for batch in self._ds.iter(batch_size=GROUP_ROWS):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield f"{self.path} row {i}", dict(zip(keys, values))
                i += 1

    def close(self) -> None:
        pass


class ListSource:
    """Rows already in memory (generated tasks, Python iterables)."""

    def __init__(self, rows: Sequence[dict], name: str = "rows"):
        self.rows = rows
        self.path = name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def where(self, i: int) -> str:
        return f"{self.path} row {i}"

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        for i, row in enumerate(self.rows):
            yield self.where(i), row

    def close(self) -> None:
        pass


class ConcatSource:
    """Several sources one after the other (the files of a directory, in name order)."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self.path = ", ".join(s.path for s in self.sources)
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources], dtype=np.int64)]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        k = bisect.bisect_right(self._starts, i) - 1
        return self.sources[k], i - self._starts[k]

    def __getitem__(self, i: int) -> dict:
        source, j = self._locate(int(i))
        return source[j]

    def where(self, i: int) -> str:
        source, j = self._locate(int(i))
        return source.where(j)

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        for source in self.sources:
            yield from source.iter_rows()

    def close(self) -> None:
        for source in self.sources:
            source.close()


def data_files(path: str, kind: str) -> list[str]:
    """The files ``path`` names for a ``kind`` (jsonl, parquet) source: the file itself, the matching files of a
    directory (name order), or the matches of a glob pattern."""
    suffixes = FILE_SUFFIXES[kind]
    if any(ch in path for ch in "*?["):
        files = paths.glob(path)
        if not files:
            raise FileNotFoundError(f"no data files match {path}")
        return files
    if paths.isdir(path):
        files = [paths.join(path, name) for name in paths.listdir(path) if name.lower().endswith(suffixes)]
        if not files:
            raise FileNotFoundError(f"data directory {path} holds no {kind} files ({', '.join(suffixes)})")
        return files
    if not paths.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    return [path]


def open_file_source(kind: str, path: str, *, cache: str | None = None, split: str = "train"):
    """The source of ``kind`` (jsonl, parquet, hf_disk) at ``path`` (file, directory or glob)."""
    if kind == "hf_disk":
        return HFDiskSource(path, split=split)
    cls = {"jsonl": JsonlSource, "parquet": ParquetSource}[kind]
    sources = [cls(f, cache=cache) for f in data_files(path, kind)]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
