"""Proven lower bounds on the makespan of any layer-to-worker assignment (seconds)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from planner.solve.instance import check_speeds


def trivial_lower_bound_s(*, work: Sequence[float], workers: int,
                          speeds: Sequence[float] | None = None) -> float:
    """max(total work / sum of speeds, largest layer / fastest speed), seconds: the workers
    together cannot beat perfect sharing, and the largest layer must run whole somewhere."""
    speeds = check_speeds(speeds, workers)
    if not work:
        return 0.0
    return max(sum(work) / sum(speeds), max(work) / max(speeds))


def pigeonhole_lower_bound_s(*, work: Sequence[float], workers: int,
                             speeds: Sequence[float] | None = None) -> float:
    """max over k >= 1 of (sum of the k+1 smallest of the kP+1 largest layers) / fastest speed.

    Among the kP+1 largest layers some worker gets at least k+1 (pigeonhole), so its load is at
    least the sum of the k+1 smallest of them. For P workers and many equal layers this is the
    true optimum (e.g. 144 equal layers on 64 workers: 3 layers), which the trivial bound misses.
    """
    speeds = check_speeds(speeds, workers)
    n = len(work)
    if n <= workers:
        return 0.0
    w = np.sort(np.asarray(work, dtype=float))[::-1]
    prefix = np.concatenate(([0.0], np.cumsum(w)))
    ks = np.arange(1, (n - 1) // workers + 1)
    top = ks * workers + 1                      # number of largest layers considered
    sums = prefix[top] - prefix[top - ks - 1]   # the k+1 smallest of them
    return float(sums.max()) / max(speeds)


def makespan_lower_bound_s(*, work: Sequence[float], workers: int,
                           speeds: Sequence[float] | None = None) -> float:
    """The best of the bounds above, seconds (0 when there is no work)."""
    return max(trivial_lower_bound_s(work=work, workers=workers, speeds=speeds),
               pigeonhole_lower_bound_s(work=work, workers=workers, speeds=speeds))
