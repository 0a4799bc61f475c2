"""Timing helpers shared by the benchmarks."""
from __future__ import annotations

import os
import platform
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


def machine() -> str:
    """The CPU the figures come from: model, cores, and whether it has AVX-512 (the peers' kernels and XLA's gain
    from it differently, so the ratios move with the machine)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model name from platform only
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "ISA unknown" if not flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {isa}"
