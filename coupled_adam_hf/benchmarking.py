"""Timing helpers shared by the benchmark scripts (``scripts/bench_*.py``): one call timed to the device, quantiles.

Benchmarks here compare contenders side by side in one process and report ratios; these helpers only make each
timed call honest on an asynchronous device (the clock stops after the device has finished the work).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["synchronize", "timed", "quantile"]


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (CUDA); a no-op on the CPU, where every call is synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` as one of them (the nearest rank from below; no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
