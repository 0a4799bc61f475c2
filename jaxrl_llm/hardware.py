"""Facts about the machine: peak dense bfloat16 FLOP/s of common accelerators (for the MFU estimate in the
trainer's metrics) and the CPU cores a process may use."""
from __future__ import annotations

__all__ = ["PEAK_TFLOPS", "peak_tflops", "cpu_cores"]

# per chip / GPU, dense (no sparsity) bfloat16 matmul TFLOP/s from the vendors' data sheets; MFU is quoted against
# this figure whatever dtype the model computes in, as is customary. Ordered: the first key found in the
# lower-cased jax device_kind wins ("v5 lite" is v5e; a bare "tpu v5" is v5p).
PEAK_TFLOPS: dict[str, float] = {
    "v6 lite": 918.0, "v6e": 918.0,
    "v5 lite": 197.0, "v5e": 197.0,
    "v5p": 459.0, "tpu v5": 459.0,
    "tpu v4": 275.0,
    "h100 pcie": 756.0, "h100": 989.0, "h200": 989.0,  # also GH200
    "b200": 2250.0,
    "a100": 312.0,
    "l40s": 362.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Peak bf16 TFLOP/s of one device of this ``jax.Device.device_kind``; None when unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS.items():
        if key in kind:
            return value
    return None


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what a container, ``taskset`` or a scheduler
    such as SLURM grants it, which can be far fewer than the machine's ``os.cpu_count()``)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        return max(1, os.cpu_count() or 1)
