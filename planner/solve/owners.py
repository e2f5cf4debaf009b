"""How many workers should own layers: fewer owners, fewer broadcasts.

The solvers minimise the busiest worker's K-FAC compute, which spreads layers over as many
workers as help. But every owner pays one fused broadcast per step, and a broadcast's latency
grows with the rank count ((p - 1) alpha' for a pipelined broadcast), so on large clusters a
placement on fewer owners can have a longer compute makespan and still a shorter step. The
owner search solves the placement again restricted to the k fastest workers for k =
min(workers, layers) halving down to 1 (skipping counts not below the solvers' own owner
count), and keeps the placement with the shortest predicted step. It minimises time, not
memory: without a memory cap, fewer owners hold more second-order state each.
Pure functions over plain data; seconds throughout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from dpkfac.core.errors import InputError
from planner.solve.solvers import Solution, solve


@dataclass(frozen=True)
class OwnerTrial:
    """One owner count tried: the owners allowed and the predicted mean step, seconds (None when
    the solvers found no placement within the memory caps on that many workers)."""
    owners: int
    step_time_s: float | None


def owner_counts(*, workers: int, layers: int) -> tuple[int, ...]:
    """Owner counts to try, descending: min(workers, layers), then halving down to 1."""
    counts, k = [], max(min(workers, layers), 1)
    while True:
        counts.append(k)
        if k == 1:
            return tuple(counts)
        k = max(k // 2, 1)


def fastest_ranks(speeds: Sequence[float], count: int) -> tuple[int, ...]:
    """The `count` fastest ranks (ties to the lower rank), in rank order."""
    order = sorted(range(len(speeds)), key=lambda r: (-speeds[r], r))
    return tuple(sorted(order[:count]))


def solve_on_ranks(ranks: Sequence[int], *, work: Sequence[float], speeds: Sequence[float],
                   memory: Sequence[int], caps: Sequence[int] | None,
                   time_limit_s: float) -> Solution | None:
    """The heuristics' and local search's placement on `ranks` only, with owners as ranks of the
    whole cluster (None when the caps cannot be met there)."""
    try:
        sub = solve("local-search", work=work, workers=len(ranks),
                    speeds=[speeds[r] for r in ranks], memory=memory,
                    memory_cap=None if caps is None else [caps[r] for r in ranks],
                    time_limit_s=time_limit_s)
    except InputError:
        return None
    plural = "s" if len(ranks) > 1 else ""
    return replace(sub, owners=tuple(ranks[o] for o in sub.owners), status="heuristic",
                   method=f"{sub.method} on {len(ranks)} owner{plural}")


def search_owners(full: Solution, *, step_time_of: Callable[[Sequence[int]], float],
                  work: Sequence[float], speeds: Sequence[float], memory: Sequence[int],
                  caps: Sequence[int] | None,
                  time_limit_s: float) -> tuple[Solution, tuple[OwnerTrial, ...]]:
    """`full` (the placement over all workers) or a placement on fewer owners whose predicted
    step (`step_time_of(owners)`, seconds) is shorter; and every count tried. A smaller count
    must be faster by more than one part in 10^9 to win (ties keep more owners). The result
    keeps `full`'s lower bound and ILP outcome; its solve time adds the search's."""
    started = time.perf_counter()
    counts = owner_counts(workers=len(speeds), layers=len(work))
    best, best_s = full, step_time_of(full.owners)
    trials = [OwnerTrial(owners=len(set(full.owners)), step_time_s=best_s)]
    per_count_s = time_limit_s / max(len(counts), 1)
    for k in counts:
        if k >= len(set(full.owners)):
            continue
        candidate = solve_on_ranks(fastest_ranks(speeds, k), work=work, speeds=speeds,
                                   memory=memory, caps=caps, time_limit_s=per_count_s)
        step_s = None if candidate is None else step_time_of(candidate.owners)
        trials.append(OwnerTrial(owners=k, step_time_s=step_s))
        if step_s is not None and step_s < best_s * (1 - 1e-9):
            best, best_s = candidate, step_s
    searched_s = time.perf_counter() - started
    return replace(best, lower_bound_s=full.lower_bound_s, ilp=full.ilp,
                   solve_time_s=full.solve_time_s + searched_s), tuple(trials)
