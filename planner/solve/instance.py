"""One placement problem as plain numbers: layer work and memory, worker speeds and caps.

Units: work in seconds at speed 1, memory in bytes, speeds relative (a worker of speed 2 does the
same work in half the time), caps in bytes of layer state per worker (None: no cap).
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dpkfac.core.errors import InputError


@dataclass(frozen=True)
class Instance:
    """A makespan-scheduling instance. `caps[w]` is worker w's memory cap in bytes, or caps is
    None for no cap."""
    work: tuple[float, ...]
    workers: int
    speeds: tuple[float, ...]
    memory: tuple[int, ...]
    caps: tuple[int, ...] | None

    @property
    def identical_workers(self) -> bool:
        """Whether every worker has the same speed and the same cap (relabelling is free)."""
        same_caps = self.caps is None or len(set(self.caps)) <= 1
        return len(set(self.speeds)) <= 1 and same_caps

    @property
    def uniform_cap(self) -> int | None:
        """The one cap every worker shares, or None (no caps, or caps that differ)."""
        if self.caps is None or len(set(self.caps)) != 1:
            return None
        return self.caps[0]


def check_speeds(speeds: Sequence[float] | None, workers: int) -> tuple[float, ...]:
    """Worker speeds as a tuple (all 1.0 when None); InputError if not `workers` positive numbers."""
    if workers < 1:
        raise InputError(f"number of workers must be >= 1, got {workers}")
    if speeds is None:
        return (1.0,) * workers
    speeds = tuple(float(s) for s in speeds)
    if len(speeds) != workers:
        raise InputError(f"expected {workers} worker speeds, got {len(speeds)}")
    if not all(s > 0 and math.isfinite(s) for s in speeds):
        raise InputError(f"worker speeds must be positive numbers, got {list(speeds)}")
    return speeds


def check_caps(memory_cap: int | Sequence[int] | None, workers: int) -> tuple[int, ...] | None:
    """Per-worker caps in bytes from one cap for all, one per worker, or None."""
    if memory_cap is None:
        return None
    if isinstance(memory_cap, numbers.Integral):
        caps = (int(memory_cap),) * workers
    else:
        caps = tuple(int(c) for c in memory_cap)
        if len(caps) != workers:
            raise InputError(f"expected {workers} per-worker memory caps, got {len(caps)}")
    if any(c < 0 for c in caps):
        raise InputError(f"memory cap must be >= 0 bytes, got {min(caps)}")
    return caps


def make_instance(*, work: Sequence[float], workers: int, speeds: Sequence[float] | None = None,
                  memory: Sequence[int] | None = None,
                  memory_cap: int | Sequence[int] | None = None) -> Instance:
    """Check and freeze an instance; InputError for anything malformed."""
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"number of workers must be an integer >= 1, got {workers!r}")
    workers = int(workers)
    work = tuple(float(w) for w in work)
    if not all(w >= 0 and math.isfinite(w) for w in work):
        raise InputError("layer work must be finite non-negative seconds")
    memory = tuple(int(m) for m in memory) if memory is not None else (0,) * len(work)
    if len(memory) != len(work):
        raise InputError(f"expected {len(work)} layer memory sizes, got {len(memory)}")
    if any(m < 0 for m in memory):
        raise InputError("layer memory must be non-negative bytes")
    return Instance(work=work, workers=workers, speeds=check_speeds(speeds, workers),
                    memory=memory, caps=check_caps(memory_cap, workers))


def worker_loads_s(*, work: Sequence[float], owners: Sequence[int], workers: int,
                   speeds: Sequence[float] | None = None) -> tuple[float, ...]:
    """Seconds each worker spends on its layers: sum of its layers' work / its speed."""
    speeds = check_speeds(speeds, workers)
    totals = [0.0] * workers
    for w_l, owner in zip(work, owners):
        totals[owner] += w_l
    return tuple(t / s for t, s in zip(totals, speeds))


def makespan_s(*, work: Sequence[float], owners: Sequence[int], workers: int,
               speeds: Sequence[float] | None = None) -> float:
    """The slowest worker's time, seconds (0 when there is no work)."""
    return max(worker_loads_s(work=work, owners=owners, workers=workers, speeds=speeds),
               default=0.0)


def memory_loads(*, memory: Sequence[int], owners: Sequence[int], workers: int) -> tuple[int, ...]:
    """Bytes of layer state each worker holds."""
    totals = [0] * workers
    for m, owner in zip(memory, owners):
        totals[owner] += int(m)
    return tuple(totals)


def fits(inst: Instance, owners: Sequence[int]) -> bool:
    """Whether every worker's layer state is within its cap."""
    if inst.caps is None:
        return True
    held = memory_loads(memory=inst.memory, owners=owners, workers=inst.workers)
    return all(h <= c for h, c in zip(held, inst.caps))


def instance_makespan_s(inst: Instance, owners: Sequence[int]) -> float:
    """makespan_s of `owners` on `inst`, seconds."""
    return makespan_s(work=inst.work, owners=owners, workers=inst.workers, speeds=inst.speeds)


def as_arrays(inst: Instance) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(work, speeds, memory, caps) as numpy arrays; caps are +inf when there is no cap."""
    caps = (np.full(inst.workers, np.inf) if inst.caps is None
            else np.asarray(inst.caps, dtype=float))
    return (np.asarray(inst.work, dtype=float), np.asarray(inst.speeds, dtype=float),
            np.asarray(inst.memory, dtype=float), caps)


def brute_force_makespan_s(*, work: Sequence[float], workers: int,
                           speeds: Sequence[float] | None = None,
                           memory: Sequence[int] | None = None, cap: int | None = None) -> float:
    """The optimal makespan, seconds, by trying all workers^layers assignments (tiny instances
    only: the reference the solvers are checked against); inf when no assignment fits `cap`."""
    best = float("inf")
    for owners in itertools.product(range(workers), repeat=len(work)):
        if cap is not None and max(memory_loads(memory=memory, owners=owners,
                                                workers=workers)) > cap:
            continue
        best = min(best, makespan_s(work=work, owners=owners, workers=workers, speeds=speeds))
    return best
