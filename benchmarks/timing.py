"""Timing helper shared by the benchmarks."""
from __future__ import annotations

import statistics
import time

# seconds before each timed call: another library's idle worker threads spin for a while before they sleep
PAUSE = 0.5


def median_times(fns: dict, repeats: int, pause: float = PAUSE) -> dict:
    """Median seconds of each function, after one warm-up call each. The functions take turns, so a slow spell of
    a shared machine hits them alike, with ``pause`` seconds before each call."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
