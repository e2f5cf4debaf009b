"""Workers that share a host's cores: when each finishes its compute, if k computing at once
each take time_factor(k) seconds per second of its busy figure (processor sharing)."""
from __future__ import annotations

from typing import Callable

import numpy as np


def shared_ends(starts: np.ndarray, work: np.ndarray,
                time_factor: Callable[[int], float]) -> np.ndarray:
    """End times (seconds) of workers that start at starts[w] with work[w] seconds of compute
    (busy figures), when with k of them computing at once each progresses at 1 / time_factor(k)
    busy-seconds per second. Workers without work end at their start."""
    starts = np.asarray(starts, dtype=float)
    work = np.asarray(work, dtype=float)
    left = work.copy()
    ends = starts.copy()
    todo = left > 0
    if not todo.any():
        return ends
    t = float(starts[todo].min())
    while todo.any():
        active = todo & (starts <= t)
        waiting = todo & ~active
        next_start = float(starts[waiting].min()) if waiting.any() else np.inf
        if not active.any():
            t = next_start
            continue
        rate = 1.0 / time_factor(int(active.sum()))
        dt = min(float(left[active].min()) / rate, next_start - t)
        left[active] -= dt * rate
        t += dt
        done = active & (left <= 1e-12 * work)
        ends[done] = t
        todo &= ~done
    return ends
