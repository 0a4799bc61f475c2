"""One path layer for every file the project reads or writes: local paths and URIs.

A *path* is either a local path (``runs/x``, ``/data/p.jsonl``) or a URI ``scheme://...`` that fsspec knows:
``gs://`` (needs ``gcsfs``: ``pip install jaxrl_llm[gcs]``), ``s3://`` (``s3fs``: ``jaxrl_llm[s3]``), ``file://``,
``memory://`` (in-process, for tests), ``hf://`` and any other registered fsspec protocol. Local paths go through
the standard library (no overhead); URIs through fsspec. Nothing here turns a URI into a local path by accident:
``os.path.abspath("gs://b/x")`` would give ``/cwd/gs:/b/x``, :func:`absolute` leaves URIs alone.

Three things object stores cannot do the way a local disk does, and how the project copes:

* **Appending.** GCS and S3 objects are written whole. :class:`jaxrl_llm.tracking.MetricsLogger` keeps a URI's
  ``metrics.jsonl`` in memory (it is small) and rewrites the object at most every few seconds and at the end;
  TensorBoard event files do the same through a writer registered with tensorboardX (:func:`tensorboard_writer`).
* **Local-only readers.** ``safetensors.safe_open`` memory-maps a local file and ``transformers`` reads tokenizer
  files from a local directory. :func:`local_copy` mirrors a URI directory (a model checkpoint) into a local cache
  directory once: ``$JAXRL_CACHE_DIR`` or ``~/.cache/jaxrl_llm``, ``models/<sha1 of the URI>/``; a file whose size
  matches the source is not copied again, and each file is written to a temporary name and renamed, so several
  processes of one host may fill the same cache at once. On a pod slice every host copies the checkpoint to its
  own disk (each host's devices read their own blocks of every tensor from it).
* **Local-only writers.** ``safetensors.save_file`` and ``save_pretrained`` write to a directory:
  :func:`staged_output` hands them a local temporary directory and uploads its files on exit.

Orbax checkpoints are a separate matter (see :mod:`jaxrl_llm.checkpoint`): orbax reaches storage through
etils.epath and tensorstore, which accept local paths and ``gs://`` only.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["is_uri", "protocol", "local_path", "absolute", "join", "dirname", "basename", "open", "exists",
           "isdir", "isfile", "listdir", "glob", "makedirs", "remove", "rmtree", "size", "read_text", "write_text",
           "read_bytes", "write_bytes", "local_copy", "staged_output", "upload_dir", "cache_dir", "filesystem",
           "tensorboard_writer"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}


def protocol(path) -> str:
    """The URI scheme (``gs``, ``s3``, ``memory``, ``file`` ...), or ``""`` for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else ""


def is_uri(path) -> bool:
    return bool(protocol(path))


def local_path(path) -> str | None:
    """The local filesystem path of a local path or a ``file://`` URI; None for any other URI."""
    path = os.fspath(path)
    scheme = protocol(path)
    if not scheme:
        return path
    if scheme in ("file", "local"):
        return _SCHEME.sub("", path, count=1) or "/"
    return None


def absolute(path) -> str:
    """An absolute local path, or the URI unchanged."""
    path = os.fspath(path)
    return path if is_uri(path) else os.path.abspath(path)


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def dirname(path) -> str:
    path = os.fspath(path)
    if not is_uri(path):
        return os.path.dirname(path)
    scheme = protocol(path)
    rest = posixpath.dirname(path[len(scheme) + 3:].rstrip("/"))
    return f"{scheme}://{rest}"


def basename(path) -> str:
    path = os.fspath(path).rstrip("/")
    return posixpath.basename(path) if is_uri(path) else os.path.basename(path)


def filesystem(path):
    """``(fsspec filesystem, path inside it)`` for a URI; a missing backend is an error naming the extra."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(os.fspath(path))
    except ImportError as err:
        extra = _EXTRAS.get(protocol(path))
        hint = f" (pip install 'jaxrl_llm[{extra}]')" if extra else ""
        raise ImportError(f"cannot open {path}: {err}{hint}") from None


def open(path, mode: str = "r", *, encoding: str | None = "utf-8", **kwargs):  # noqa: A001  (mirrors builtins)
    """A file object for a local path or a URI (a context manager; text modes are UTF-8)."""
    path = os.fspath(path)
    enc = None if "b" in mode else encoding
    if not is_uri(path):
        return builtins.open(path, mode, encoding=enc)
    fs, inner = filesystem(path)
    if "b" in mode:
        return fs.open(inner, mode, **kwargs)
    import io

    return io.TextIOWrapper(fs.open(inner, mode.replace("t", "") + "b", **kwargs), encoding=enc, newline="")


def _dispatch(path, local, remote):
    """``local(path)`` for a local path, ``remote(fs, inner)`` for a URI (its fsspec filesystem and inner path)."""
    path = os.fspath(path)
    if not is_uri(path):
        return local(path)
    return remote(*filesystem(path))


def exists(path) -> bool:
    return _dispatch(path, os.path.exists, lambda fs, inner: fs.exists(inner))


def isdir(path) -> bool:
    return _dispatch(path, os.path.isdir, lambda fs, inner: fs.isdir(inner))


def isfile(path) -> bool:
    return _dispatch(path, os.path.isfile, lambda fs, inner: fs.isfile(inner))


def _ls_names(fs, inner: str) -> list[str]:
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)
                  if p.rstrip("/") != inner.rstrip("/"))


def listdir(path) -> list[str]:
    """Names (not paths) of the entries of a directory, sorted."""
    return _dispatch(path, lambda p: sorted(os.listdir(p)), _ls_names)


def glob(pattern) -> list[str]:
    """Paths matching a glob pattern, sorted, in the pattern's own form (URIs stay URIs)."""
    pattern = os.fspath(pattern)
    if not is_uri(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    fs, inner = filesystem(pattern)
    scheme = protocol(pattern)
    written = pattern[len(scheme) + 3:]
    # fsspec may root the inner path differently (memory:// adds a leading "/"): give matches the pattern's form
    lead = inner[:len(inner) - len(written)] if inner.endswith(written) else ""
    return sorted(f"{scheme}://{p[len(lead):]}" if p.startswith(lead) else fs.unstrip_protocol(p)
                  for p in fs.glob(inner))


def makedirs(path) -> None:
    _dispatch(path, lambda p: os.makedirs(p, exist_ok=True), lambda fs, inner: fs.makedirs(inner, exist_ok=True))


def remove(path) -> None:
    _dispatch(path, os.remove, lambda fs, inner: fs.rm(inner))


def _rm_tree(fs, inner: str) -> None:
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def rmtree(path) -> None:
    _dispatch(path, lambda p: shutil.rmtree(p, ignore_errors=True), _rm_tree)


def size(path) -> int:
    return _dispatch(path, os.path.getsize, lambda fs, inner: int(fs.size(inner)))


def read_text(path) -> str:
    with open(path, "r") as f:
        return f.read()


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Write a whole file; local files are written to a temporary name and renamed (never seen half-written)."""
    path = os.fspath(path)
    parent = dirname(path)
    if parent:
        makedirs(parent)
    if is_uri(path):  # an object store makes an object visible only once it is complete
        with open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def cache_dir(kind: str, override: str | None = None) -> str:
    """A local cache directory for ``kind`` (``models``, ``data``): ``override``, else ``$JAXRL_CACHE_DIR/kind``,
    else ``$XDG_CACHE_HOME/jaxrl_llm/kind`` (``~/.cache/...``)."""
    if override:
        return os.path.abspath(override)
    root = os.environ.get("JAXRL_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "jaxrl_llm")
    return os.path.join(root, kind)


def cache_key(path: str) -> str:
    return hashlib.sha1(os.fspath(path).encode("utf-8")).hexdigest()[:16]


def local_copy(path, *, cache: str | None = None, kind: str = "models") -> str:
    """A local directory holding the files of directory ``path``: ``path`` itself when it is local (or
    ``file://``), else a mirror of its top-level files in the cache (``cache`` or :func:`cache_dir`), copied only
    when missing or of another size."""
    path = os.fspath(path)
    local = local_path(path)
    if local is not None:
        return local
    fs, inner = filesystem(path)
    if not fs.isdir(inner):
        raise FileNotFoundError(f"not a directory: {path}")
    target = os.path.join(cache_dir(kind, cache), cache_key(path))
    os.makedirs(target, exist_ok=True)
    for info in fs.ls(inner, detail=True):
        if info.get("type") != "file":
            continue
        name = posixpath.basename(info["name"].rstrip("/"))
        dest = os.path.join(target, name)
        if os.path.exists(dest) and os.path.getsize(dest) == info.get("size"):
            continue
        tmp = f"{dest}.tmp.{os.getpid()}"
        fs.get_file(info["name"], tmp)
        os.replace(tmp, dest)
    return target


def upload_dir(local_dir: str, path) -> None:
    """Copy the files of a local directory (recursively) to ``path``."""
    path = os.fspath(path)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            dest = join(path, name) if rel == "." else join(path, *rel.split(os.sep), name)
            with builtins.open(os.path.join(root, name), "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)


@contextlib.contextmanager
def staged_output(path) -> Iterator[str]:
    """A local directory to write ``path``'s files into: ``path`` itself when local (created), else a temporary
    directory whose files are uploaded to ``path`` when the block ends without an error."""
    path = os.fspath(path)
    local = local_path(path)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="jaxrl_stage_") as tmp:
        yield tmp
        makedirs(path)
        upload_dir(tmp, path)


class _BufferedObject:
    """A write-only file whose whole content is rewritten to ``path`` on every flush (object stores have no
    append); what tensorboardX's record writers call."""

    def __init__(self, path: str):
        import io

        self.path = path
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _TensorboardFactory:
    def open(self, path):
        return _BufferedObject(path)

    def directory_check(self, path):
        makedirs(path)


def tensorboard_writer(logdir: str, purge_step: int | None = None):
    """A tensorboardX ``SummaryWriter`` for a local directory or a URI (event files of a URI are kept in memory
    and rewritten whole at each flush: every ``flush_secs`` and on close)."""
    from tensorboardX import SummaryWriter
    from tensorboardX import record_writer

    scheme = protocol(logdir)
    if scheme and scheme not in ("file", "local"):
        record_writer.register_writer_factory(scheme, _TensorboardFactory())
    return SummaryWriter(local_path(logdir) or logdir, purge_step=purge_step)
