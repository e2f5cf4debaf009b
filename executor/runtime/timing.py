"""Wall-clock timing of named phases, with optional device synchronisation."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


def synchronize_device() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Accumulates seconds per named phase; `synchronize` waits for the device at each edge."""

    def __init__(self, phases: Sequence[str], *, synchronize: bool = False) -> None:
        self._phases = tuple(phases)
        self._synchronize = synchronize
        self._seconds = dict.fromkeys(self._phases, 0.0)
        self.current: str | None = None  # the phase running now (named in fault messages)

    def reset(self) -> None:
        """Zero every phase."""
        self._seconds = dict.fromkeys(self._phases, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block into phase `name`."""
        if self._synchronize:
            synchronize_device()
        start = time.perf_counter()
        self.current = name
        yield  # on an exception `current` keeps naming the phase that failed
        if self._synchronize:
            synchronize_device()
        self._seconds[name] += time.perf_counter() - start
        self.current = None

    def times(self) -> dict[str, float]:
        """Seconds per phase since the last reset."""
        return dict(self._seconds)


def median_time(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15,
                min_total_s: float = 0.05) -> tuple[float, float]:
    """Median and interquartile spread of `fn`'s wall time in seconds, after warm-up.

    Repeats until both `repeats` runs and `min_total_s` seconds of measurement are done
    (capped at 20x repeats), synchronising the device around every run.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_total_s and len(samples) < 20 * repeats):
        synchronize_device()
        start = time.perf_counter()
        fn()
        synchronize_device()
        samples.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(samples, n=4)
    return statistics.median(samples), quartiles[2] - quartiles[0]
