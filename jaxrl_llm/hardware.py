"""Peak dense bfloat16 FLOP/s of common accelerators, for the MFU estimate in the trainer's metrics."""
from __future__ import annotations

__all__ = ["PEAK_TFLOPS", "peak_tflops"]

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
