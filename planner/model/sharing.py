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
    agents = _Agents(starts, chunks, threads, thread_starts, thread_after)
    ready, left, todo = agents.ready, agents.left, agents.todo
    t = float(ready[todo].min()) if todo.any() else 0.0
    while todo.any():
        done = todo & (ready <= t) & (left <= 0.0)
        while done.any():  # chunks that end now (next ones may be empty too)
            for a in np.flatnonzero(done):
                agents.finish(int(a), t)
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
    return agents.ends, agents.thread_ends


class _Agents:
    """shared_chunk_ends' state: agents 0..workers-1 run the workers' chunks, agents
    workers..2 workers-1 their threads; when each may run (`ready`, inf: not released yet),
    what is left of its current chunk (`left`), whether it has more to do (`todo`)."""

    def __init__(self, starts, chunks, threads, thread_starts, thread_after) -> None:
        starts = np.asarray(starts, dtype=float)
        self.chunks = np.asarray(chunks, dtype=float).reshape(len(starts), -1)
        self.workers, count = self.chunks.shape
        workers = self.workers
        threads = np.zeros(workers) if threads is None else np.asarray(threads, dtype=float)
        fixed = starts if thread_starts is None else np.asarray(thread_starts, dtype=float)
        self.after = None if not thread_after else min(thread_after, count)
        if self.after == 0:  # no chunks to wait for
            fixed, self.after = np.maximum(fixed, starts), None
        self.fixed = fixed
        self.ready = np.concatenate([starts, fixed if self.after is None
                                     else np.full(workers, np.inf)])
        self.left = np.concatenate([self.chunks[:, 0] if count else np.zeros(workers), threads])
        self.todo = np.concatenate([np.full(workers, count > 0), threads > 0])
        self.index = np.zeros(workers, dtype=int)  # each worker's current chunk
        self.ends = np.zeros((workers, count))
        self.thread_ends = fixed.copy()

    def finish(self, agent: int, t: float) -> None:
        """Agent `agent` has no work left in its current chunk at `t`: record the chunk's end
        (a worker's: then its next chunk starts and, once it has done `after` chunks, its
        thread is released) or the thread's end."""
        workers = self.workers
        if agent >= workers:
            self.thread_ends[agent - workers] = t
            self.todo[agent] = False
            return
        k = self.index[agent]
        self.ends[agent, k] = t
        if self.after is not None and k + 1 == self.after:
            self.ready[workers + agent] = max(t, self.fixed[agent])
            self.thread_ends[agent] = self.ready[workers + agent]
        self.index[agent] = k + 1
        if k + 1 < self.chunks.shape[1]:
            self.left[agent] = self.chunks[agent, k + 1]
        else:
            self.todo[agent] = False
