"""Wall-clock timing of named phases, with optional device synchronisation."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

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
