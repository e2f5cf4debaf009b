"""The baseline placement rules, each a pure function of an Instance returning owners or None
(None: the rule found no assignment within the memory caps).

* round_robin: the seed's rule, layer i -> rank i % P.
* greedy: KAISA's longest processing time first, each layer to the worker that finishes it first.
* block: SPD-KFAC's optimal contiguous blocks in layer order (block j to worker j).
"""
from __future__ import annotations

import numpy as np

from planner.solve.instance import Instance, as_arrays, fits


def round_robin(inst: Instance) -> tuple[int, ...] | None:
    """Layer i to rank i % P (the seed's code); None if that breaks a cap."""
    owners = tuple(i % inst.workers for i in range(len(inst.work)))
    return owners if fits(inst, owners) else None


def greedy(inst: Instance) -> tuple[int, ...] | None:
    """Longest processing time first: each layer, largest first, to the worker that would finish
    it earliest among those it fits (ties: less memory held, then lower rank)."""
    work, speeds, memory, caps = as_arrays(inst)
    order = sorted(range(len(work)), key=lambda l: (-work[l], -memory[l], l))
    load = np.zeros(inst.workers)
    held = np.zeros(inst.workers)
    owners = [0] * len(work)
    for l in order:
        finish = (load + work[l]) / speeds
        finish[held + memory[l] > caps] = np.inf
        best = finish.min()
        if not np.isfinite(best):
            return None
        ties = np.flatnonzero(finish <= best)
        w = int(ties[np.argmin(held[ties])]) if len(ties) > 1 else int(ties[0])
        owners[l] = w
        load[w] += work[l]
        held[w] += memory[l]
    return tuple(owners)


def block(inst: Instance) -> tuple[int, ...] | None:
    """Contiguous blocks in layer order, block j to worker j, least makespan.

    For a makespan T, giving each worker in turn the longest block that fits (work <= T * speed,
    memory <= cap) succeeds iff any contiguous partition meets T (each greedy block ends no
    earlier than the same block of any feasible partition). Bisection on T, then the partition
    at the smallest feasible T found. O(P log n) per test.
    """
    work, speeds, memory, caps = as_arrays(inst)
    n = len(work)
    if n == 0:
        return ()
    prefix_w = np.concatenate(([0.0], np.cumsum(work)))
    prefix_m = np.concatenate(([0.0], np.cumsum(memory)))

    def cuts(limit: float) -> list[int] | None:
        ends, pos = [], 0
        for j in range(inst.workers):
            end_w = int(np.searchsorted(prefix_w, prefix_w[pos] + limit * speeds[j], "right")) - 1
            end_m = int(np.searchsorted(prefix_m, prefix_m[pos] + caps[j], "right")) - 1
            pos = max(pos, min(end_w, end_m, n))
            ends.append(pos)
            if pos == n:
                return ends + [n] * (inst.workers - j - 1)
        return None

    hi = float(prefix_w[-1]) / float(speeds.min()) * (1 + 1e-9) + 1e-300
    if cuts(hi) is None:
        return None
    lo = 0.0
    for _ in range(200):
        if hi - lo <= 1e-13 * hi:
            break
        mid = 0.5 * (lo + hi)
        if cuts(mid) is None:
            lo = mid
        else:
            hi = mid
    ends = cuts(hi)
    owners, start = [0] * n, 0
    for j, end in enumerate(ends):
        owners[start:end] = [j] * (end - start)
        start = end
    return tuple(owners)


HEURISTIC_RULES = {"round-robin": round_robin, "greedy": greedy, "block": block}
