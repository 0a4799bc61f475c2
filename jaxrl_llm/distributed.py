"""Multi-process runs through JAX's own distributed runtime (TPU pod slices, SLURM GPU clusters, N CPU processes).

:func:`initialize` must run before anything touches a JAX backend. It starts the runtime when the environment
asks for it and is a no-op for a single process:

* explicit: ``JAXRL_COORDINATOR=host:port``, ``JAXRL_NUM_PROCESSES``, ``JAXRL_PROCESS_ID`` (what
  ``launch/multiprocess_cpu.sh`` sets; also the CLI flags ``--coordinator/--num-processes/--process-id``);
* SLURM (``SLURM_NTASKS > 1``) and TPU VM slices (``TPU_WORKER_HOSTNAMES`` with several hosts): JAX detects the
  coordinator and ranks by itself.

Every process then runs the same program over the global mesh. Arrays that span processes are read on the host
with :func:`host`, which gathers them (a collective: every process must call it).
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["initialize", "host", "is_multiprocess_env", "owned_rows", "gather_blocks", "sum_blocks", "rows_on_this_process"]


def is_multiprocess_env(environ=os.environ) -> bool:
    """Whether the environment describes a run of several processes."""
    if int(environ.get("JAXRL_NUM_PROCESSES", "1")) > 1:
        return True
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout: int = 300) -> bool:
    """Start JAX's distributed runtime if this is a multi-process run; returns whether it did.

    A process that cannot reach the coordinator within ``timeout`` seconds fails with a clear error (instead of
    waiting forever).
    """
    coordinator = coordinator or os.environ.get("JAXRL_COORDINATOR")
    if num_processes is None and "JAXRL_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXRL_NUM_PROCESSES"])
    if process_id is None and "JAXRL_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXRL_PROCESS_ID"])
    explicit = coordinator is not None or (num_processes or 1) > 1
    if not explicit and not is_multiprocess_env():
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("a multi-process run needs all of coordinator (host:port), num_processes and process_id; "
                         f"got {coordinator!r}, {num_processes!r}, {process_id!r}")
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, num_processes={num_processes})")

    if explicit and process_id != 0:
        # JAX aborts the process (no Python exception) when the coordinator never answers; probe it first
        _wait_for_coordinator(coordinator, timeout, process_id, num_processes)

    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        # CPU devices of different processes talk through gloo collectives over TCP
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=timeout)
    if explicit:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # noqa: BLE001  (the runtime raises several types; all mean the same to a user)
        where = f"coordinator {coordinator}" if coordinator else "the coordinator detected from the environment"
        raise RuntimeError(f"could not join the distributed run through {where} within {timeout} s "
                           f"(process {process_id} of {num_processes}): {err}") from None
    return True


def _wait_for_coordinator(address: str, timeout: float, process_id: int, num_processes: int) -> None:
    import socket
    import time

    host_name, _, port = address.rpartition(":")
    if not host_name or not port.isdigit():
        raise ValueError(f"coordinator must be host:port, got {address!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host_name, int(port)), timeout=2.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"could not join the distributed run through coordinator {address} within "
                                   f"{timeout:.0f} s (process {process_id} of {num_processes}): {err}. Is process 0 "
                                   "running, and is the address reachable from this host?") from None
            time.sleep(0.5)


def _cpu_only() -> bool:
    try:
        import jax

        return jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORM_NAME") == "cpu"
    except Exception:  # noqa: BLE001
        return False


def host(x) -> np.ndarray:
    """``x`` as a numpy array on every process; arrays sharded over several processes are gathered."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def owned_rows(total: int) -> np.ndarray:
    """The block of ``total`` rows this process is responsible for on the host (e.g. computing their rewards):
    an equal contiguous share per process in process order, or every row when they do not divide."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    if count == 1 or total % count:
        return np.arange(total)
    share = total // count
    return np.arange(index * share, (index + 1) * share)


def gather_blocks(block: np.ndarray, total: int) -> np.ndarray:
    """Every process's :func:`owned_rows` block of a per-row array, concatenated into all ``total`` rows (a
    collective: every process must call it)."""
    if len(block) == total:
        return np.asarray(block)
    from jax.experimental import multihost_utils

    blocks = np.asarray(multihost_utils.process_allgather(np.asarray(block)))
    return blocks.reshape((total,) + blocks.shape[2:])


def sum_blocks(counts: dict[str, float], owned: int, total: int) -> dict[str, float]:
    """Per-process counts over :func:`owned_rows` blocks (``owned`` of ``total`` rows here) summed over the
    processes; unchanged when every process handled every row."""
    if owned == total:
        return counts
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    summed = np.asarray(multihost_utils.process_allgather(np.array([counts[k] for k in keys], np.float64))).sum(0)
    return dict(zip(keys, summed.tolist()))


def rows_on_this_process(sharding, total: int) -> np.ndarray:
    """The rows (axis 0, ``total`` of them) that this process's devices hold under ``sharding``, sorted."""
    held = set()
    for index in sharding.addressable_devices_indices_map((total,)).values():
        held.update(range(*index[0].indices(total)))
    return np.array(sorted(held), dtype=np.int64)
