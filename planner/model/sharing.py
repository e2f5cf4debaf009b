"""Workers that share a host's cores: when each finishes its compute, if k computing at once
each take time_factor(k) seconds per second of its busy figure (processor sharing)."""
from __future__ import annotations

from typing import Callable

import numpy as np


def shared_chunk_ends(starts: np.ndarray, chunks: np.ndarray,
                      time_factor: Callable[[int], float], *,
                      threads: np.ndarray | None = None,
                      thread_starts: np.ndarray | None = None,
                      thread_after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """When each phase of each worker ends (seconds), for workers that start at starts[w] and
    compute chunks[w, 0], chunks[w, 1], ... one after another (busy figures, seconds), when with
    k of them computing at once each progresses at 1 / time_factor(k) busy-seconds per second,
    beside one collective thread per worker working threads[w] seconds of CPU
    from thread_starts[w] on, or, with thread_after = k, from when its worker has finished its
    first k chunks if that is later (a thread counts as one more computing). Returns (when each
    chunk ends: workers x chunks, when each thread ends); work of 0 ends where it starts."""
    starts = np.asarray(starts, dtype=float)
    chunks = np.asarray(chunks, dtype=float).reshape(len(starts), -1)
    workers, count = chunks.shape
    threads = np.zeros(workers) if threads is None else np.asarray(threads, dtype=float)
    fixed = starts if thread_starts is None else np.asarray(thread_starts, dtype=float)
    after = None if not thread_after else min(thread_after, count)
    if after == 0:  # no chunks to wait for
        fixed, after = np.maximum(fixed, starts), None
    # agents 0..workers-1 run the workers' chunks, agents workers.. the threads
    ready = np.concatenate([starts, fixed if after is None else np.full(workers, np.inf)])
    left = np.concatenate([chunks[:, 0] if count else np.zeros(workers), threads])
    index = np.zeros(workers, dtype=int)  # each worker's current chunk
    ends = np.zeros((workers, count))
    thread_ends = fixed.copy()
    todo = np.concatenate([np.full(workers, count > 0), threads > 0])
    t = float(ready[todo].min()) if todo.any() else 0.0
    while todo.any():
        done = todo & (ready <= t) & (left <= 0.0)
        while done.any():  # chunks that end now (next ones may be empty too)
            for a in np.flatnonzero(done):
                todo[a] = _finish(a, t, workers, count, chunks, index, ends, left, ready,
                                  fixed, after, thread_ends)
            done = todo & (ready <= t) & (left <= 0.0)
        active = todo & (ready <= t)
        waiting = todo & ~active
        next_start = float(ready[waiting].min()) if waiting.any() else np.inf
        if not active.any():
            if not np.isfinite(next_start):
                break
            t = next_start
            continue
        rate = 1.0 / time_factor(int(active.sum()))
        dt = min(float(left[active].min()) / rate, next_start - t)
        left[active] -= dt * rate
        t += dt
        left[active & (left <= 1e-12)] = 0.0
    return ends, thread_ends


def _finish(agent: int, t: float, workers: int, count: int, chunks: np.ndarray,
            index: np.ndarray, ends: np.ndarray, left: np.ndarray, ready: np.ndarray,
            fixed: np.ndarray, thread_after: int | None, thread_ends: np.ndarray) -> bool:
    """Agent `agent` has no work left in its current chunk at `t`: record the chunk's end (a
    worker's, then start its next one and, once it has done thread_after chunks, release its
    thread) or the thread's end; whether the agent has more to do."""
    if agent >= workers:
        thread_ends[agent - workers] = t
        return False
    k = index[agent]
    ends[agent, k] = t
    if thread_after is not None and k + 1 == thread_after:
        ready[workers + agent] = max(t, fixed[agent])
        thread_ends[agent] = ready[workers + agent]
    index[agent] = k + 1
    if k + 1 < count:
        left[agent] = chunks[agent, k + 1]
        return True
    return False
