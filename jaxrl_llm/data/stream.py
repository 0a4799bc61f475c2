"""The checkpointable prompt stream: seeded global shuffling, per-process reading, prefetch in threads (grain).

The order is a function of the seed alone: grain's ``MapDataset.shuffle`` permutes row indices with an index
shuffle (no permutation array), and ``repeat`` draws a new permutation every epoch. Global batch ``b`` holds the
rows at positions ``b * B ... b * B + B - 1`` of that endless sequence, whatever process reads them. A process
asks for the positions of each batch it needs (its devices' rows, :func:`jaxrl_llm.distributed.rows_on_this_process`):
grain reads those rows of the following batches ahead in worker threads, in order. The position in the stream is
the number of global batches handed out, ``{"batches": b}``, saved in checkpoints.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import grain
import numpy as np

__all__ = ["PromptStream"]


class PromptStream:
    """Seeded, shuffled, endlessly repeated batches of rows (a new order every epoch), with a checkpointable
    position.

    Args:
      rows: a random-access sequence of rows (``len`` and ``[i]``): a list, or a file-backed source.
      batch_size: rows per global batch.
      read_threads: worker threads that read rows ahead; ``prefetch`` batches are read ahead (0: none, rows are
        read when asked for).
    """

    def __init__(self, rows: Sequence, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 read_threads: int = 8, prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not len(rows):
            raise ValueError("the dataset is empty")
        ds = grain.MapDataset.source(rows)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        self.batch_size = batch_size
        self._rows = ds.repeat()  # random access into the endless sequence of reshuffled epochs
        self._threads = read_threads
        self._prefetch = prefetch
        self._batch = 0
        self._positions: tuple[int, ...] | None = None
        self._reader = None
        self._reading = 0  # reads running in worker threads (closing waits for them: they use open files)
        self._idle = threading.Condition()

    def _positions_of(self, positions) -> tuple[int, ...]:
        wanted = tuple(range(self.batch_size)) if positions is None else tuple(int(i) for i in positions)
        for i in wanted:
            if not 0 <= i < self.batch_size:
                raise IndexError(f"position {i} is outside a batch of {self.batch_size}")
        return wanted

    def _start_reader(self, wanted: tuple[int, ...]) -> None:
        """Read, from the current batch on, the rows at ``wanted`` of every batch (ahead, in threads)."""
        self.close()
        self._positions = wanted
        if not wanted or not self._prefetch:
            return
        first, k, size, rows = self._batch, len(wanted), self.batch_size, self._rows
        offsets = np.asarray(wanted, np.int64)

        def read(j: int) -> dict:  # the j-th row this process reads
            with self._idle:
                self._reading += 1
            try:
                return rows[(first + j // k) * size + int(offsets[j % k])]
            finally:
                with self._idle:
                    self._reading -= 1
                    self._idle.notify_all()

        reads = grain.MapDataset.range(0, 2 ** 62).map(read)
        options = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._prefetch * k)
        self._reader = iter(reads.to_iter_dataset(options))

    def next_batch(self, positions=None) -> list[dict]:
        """The next global batch, or only its rows at ``positions`` (indices within the batch, in that order)."""
        wanted = self._positions_of(positions)
        if wanted != self._positions:
            self._start_reader(wanted)
        if self._reader is not None:
            batch = [next(self._reader) for _ in wanted]
        else:
            start = self._batch * self.batch_size
            batch = [self._rows[start + i] for i in wanted]
        self._batch += 1
        return batch

    def get_state(self) -> dict:
        return {"batches": self._batch}

    def set_state(self, state: dict) -> None:
        self._batch = int(state["batches"])
        self.close()

    def close(self) -> None:
        """Stop reading ahead (the next batch starts a new reader); returns once no read is running."""
        reader, self._reader, self._positions = self._reader, None, None
        if reader is not None and hasattr(reader, "close"):
            reader.close()  # cancels the reads not started yet
        with self._idle:
            self._idle.wait_for(lambda: self._reading == 0)
