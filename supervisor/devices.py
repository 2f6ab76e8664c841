"""Which GPUs (`CUDA_VISIBLE_DEVICES`) or CPUs (vLLM's CPU binding) each worker gets."""

from __future__ import annotations

import glob


def count_gpus() -> int:
    """NVIDIA GPUs the driver exposes (0 without a driver); no NVML import needed."""
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))


def detect_gpus() -> list[int]:
    """Indices of the NVIDIA GPUs the driver exposes, without loading NVML."""
    return list(range(count_gpus()))


class GpuAssignmentError(ValueError):
    pass


def assign(count: int, per_worker: int, gpus: list[int]) -> list[list[int]]:
    """GPUs for each of `count` workers: consecutive groups of `per_worker`."""
    if per_worker <= 0:
        return [[] for _ in range(count)]
    needed = count * per_worker
    if needed > len(gpus):
        raise GpuAssignmentError(
            f"{count} workers x {per_worker} GPUs need {needed} GPUs, but only {len(gpus)} "
            f"are available ({gpus})")
    return [gpus[i * per_worker:(i + 1) * per_worker] for i in range(count)]


def split_cpus(count: int, cpus: list[int]) -> list[list[int]]:
    """CPU-engine workers: each gets its own slice of the CPUs this process may use.

    vLLM's automatic binding puts every CPU engine on the same cores; with several workers
    on one node they would fight over them while the other cores idle. Empty lists (no
    binding) when there are fewer CPUs than workers.
    """
    per_worker = len(cpus) // count if count else 0
    if per_worker < 1:
        return [[] for _ in range(count)]
    return [cpus[i * per_worker:(i + 1) * per_worker] for i in range(count)]
