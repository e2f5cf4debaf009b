"""Robust summaries of timing samples taken on a shared host (seconds in, seconds out)."""
from __future__ import annotations

import statistics

TRIM = 0.1  # share of samples dropped at each end before they are averaged


def trimmed_mean(values: list[float], cut: float = TRIM) -> float:
    """The mean of `values` without the lowest and the highest `cut` share of them. Like a
    median it drops a shared host's odd samples; unlike one it follows a kernel whose time
    flips between two speeds (a neighbour on the host's core) by how often it ran at each, as
    a training run's mean step does: a median jumps to whichever speed holds half the samples
    (fc1's eigh at 2 nodes: 13.5 or 19-20 ms per sample; rank 0's alone median 14.9-18.7 ms
    over five profiles, its 10%-trimmed mean 16.0-17.6)."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k:len(ordered) - k])
