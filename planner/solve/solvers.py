"""Assigning layers to workers so that the slowest worker finishes first (makespan scheduling),
all methods behind one function, `solve`.

The problem, in plain numbers: layer l costs ``work[l]`` seconds on a worker of speed 1; worker w
runs at ``speeds[w]`` (a worker of speed 2 does the same work in half the time) and may hold at
most ``cap[w]`` bytes of layer state (``memory[l]`` bytes per layer). Minimise the makespan
``max_w load_w / speeds[w]`` in seconds. Every layer goes to exactly one worker; workers may own
nothing.

Methods: ``round-robin`` (the seed's rule, layer i -> rank i % P), ``greedy`` (longest processing
time first, KAISA), ``block`` (optimal contiguous blocks in layer order, SPD-KFAC),
``local-search`` (moves and swaps from every heuristic's plan), ``ilp`` (exact mixed-integer
program through PuLP, warm-started from the best heuristic, time limited) and ``best`` (all of
them, least makespan wins; the ILP only when no heuristic is already within the target gap of
the lower bound and the program is small enough).

A status of ``optimal`` means proven: either the solver proved it (within a relative gap of
OPTIMALITY_GAP) or the makespan meets a proven lower bound within that gap. ``feasible`` is an
ILP incumbent without proof, ``heuristic`` a heuristic's plan.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

from dpkfac.core.errors import InputError
from planner.solve import ilp as ilp_module
from planner.solve.bounds import makespan_lower_bound_s, trivial_lower_bound_s
from planner.solve.heuristics import HEURISTIC_RULES
from planner.solve.ilp import OPTIMALITY_GAP, binary_count
from planner.solve.instance import (
    Instance,
    instance_makespan_s,
    make_instance,
    makespan_s,
    memory_loads,
    worker_loads_s,
)
from planner.solve.localsearch import balance_memory, refine_makespan
from planner.solve.names import DEFAULT_ILP_MAX_BINARIES, HEURISTICS, METHODS, auto_time_limit_s

__all__ = ["METHODS", "HEURISTICS", "OPTIMALITY_GAP", "Solution", "solve", "worker_loads_s",
           "makespan_s", "makespan_lower_bound_s", "trivial_lower_bound_s", "memory_loads",
           "smallest_cap_bounds", "auto_time_limit_s", "DEFAULT_ILP_MAX_BINARIES"]

_RANK = {"optimal": 0, "feasible": 1, "heuristic": 2}


@dataclass(frozen=True)
class Solution:
    """A layer-to-worker assignment. `owners[l]` is the rank owning layer l.

    makespan_s: max over workers of assigned work / speed, seconds.
    lower_bound_s: a proven lower bound on the optimal makespan for this instance, seconds.
    solve_time_s: wall time spent solving, seconds.
    ilp: what the ILP did ("skipped", "not run", or "<solver>: <status>").
    """
    owners: tuple[int, ...]
    method: str
    status: str
    makespan_s: float
    solve_time_s: float
    lower_bound_s: float = 0.0
    ilp: str = "not run"


def solve(method: str = "best", *, work: Sequence[float], workers: int,
          speeds: Sequence[float] | None = None, memory: Sequence[int] | None = None,
          memory_cap: int | Sequence[int] | None = None, time_limit_s: float = 10.0,
          ilp_max_binaries: int | None = None, target_gap: float = OPTIMALITY_GAP) -> Solution:
    """Assign layers to workers with `method` (see METHODS), minimising the makespan.

    work: seconds per layer at speed 1. memory: bytes of state per layer; memory_cap: bytes per
    worker, one number for all or one per worker. time_limit_s: wall-clock budget of local
    search and ILP together. ilp_max_binaries: with method "best", skip the ILP when it would
    have more binary variables than this (None: never skip).
    target_gap: relative gap to the lower bound that is good enough: "best" skips the ILP when a
    heuristic is within it, and the ILP stops there (status "optimal" still needs a proof within
    OPTIMALITY_GAP; a looser target trades that proof for speed).
    Raises InputError for bad arguments and for a memory cap no plan can meet (the message names
    the smallest cap that could work).
    """
    start = time.perf_counter()
    inst = make_instance(work=work, workers=workers, speeds=speeds, memory=memory,
                         memory_cap=memory_cap)
    if method not in METHODS:
        raise InputError(f"unknown solver {method!r}; expected one of {', '.join(METHODS)}")
    if not (time_limit_s > 0 and math.isfinite(time_limit_s)):
        raise InputError(f"time limit must be a positive number of seconds, got {time_limit_s}")
    _check_caps_possible(inst)
    bound = makespan_lower_bound_s(work=inst.work, workers=inst.workers, speeds=inst.speeds)
    deadline = start + time_limit_s

    names = (method,) if method in HEURISTICS else HEURISTICS
    candidates = [_solution(inst, owners, name, "heuristic", bound)
                  for name in names
                  if (owners := HEURISTIC_RULES[name](inst)) is not None]
    if method in ("local-search", "ilp", "best") and candidates:
        candidates += _refined(inst, candidates, bound=bound,
                               deadline=start + 0.4 * time_limit_s
                               if method != "local-search" else deadline)

    ilp_note = "not run"
    run_ilp = method == "ilp" or (method == "best" and not _meets(candidates, bound, target_gap))
    if run_ilp and method == "best" and ilp_max_binaries is not None \
            and binary_count(inst) > ilp_max_binaries:
        run_ilp, ilp_note = False, f"skipped ({binary_count(inst)} binaries)"
    if run_ilp:
        warm = min(candidates, key=lambda c: c.makespan_s) if candidates else None
        result = ilp_module.solve_ilp(inst, time_limit_s=max(deadline - time.perf_counter(), 0.1),
                                      warm_start=warm.owners if warm else None,
                                      gap=max(target_gap, OPTIMALITY_GAP))
        ilp_note = f"{result.solver}: {result.status}"
        if result.dual_bound_s is not None:
            bound = max(bound, result.dual_bound_s)
        if result.owners is not None:
            candidates.append(_solution(inst, result.owners, "ilp", result.status, bound))
        elif result.status == "infeasible" and not candidates:
            raise _cap_error(inst, "the ILP proved that no assignment fits", proven=True)

    if not candidates:
        if run_ilp:
            reason = f"the ILP found no assignment within {time_limit_s:g} s"
        elif method == "best":
            reason = (f"no heuristic found an assignment that fits and the ILP was "
                      f"{ilp_note}")
        else:
            reason = f"the {method} solver found no assignment that fits; try --solver best"
        raise _cap_error(inst, reason)
    best = min(candidates, key=lambda c: (c.makespan_s, _RANK[c.status]))
    owners = best.owners
    if method in ("local-search", "ilp", "best") and any(inst.memory) and inst.workers > 1:
        owners = balance_memory(inst, owners, makespan_s=best.makespan_s,
                                time_limit_s=max(min(0.5, deadline - time.perf_counter()), 0.05))
    span = instance_makespan_s(inst, owners)
    status = "optimal" if span <= bound * (1 + OPTIMALITY_GAP) else best.status
    return Solution(owners=tuple(owners), method=best.method, status=status, makespan_s=span,
                    solve_time_s=time.perf_counter() - start,
                    lower_bound_s=min(bound, span), ilp=ilp_note)


def smallest_cap_bounds(*, memory: Sequence[int], workers: int) -> tuple[int, int]:
    """(lower, feasible) bytes: no common cap below `lower` can work; a cap of `feasible` does.

    lower = max(largest layer state, ceil(total state / workers));
    feasible = the busiest worker after greedy packing by memory (largest first, to the emptiest).
    """
    if not memory:
        return 0, 0
    lower = max(max(memory), -(-sum(memory) // workers))
    loads = [0] * workers
    for m in sorted(memory, reverse=True):
        w = min(range(workers), key=lambda r: (loads[r], r))
        loads[w] += m
    return lower, max(loads)


# ----------------------------------------------------------------------------- internals

def _refined(inst: Instance, candidates: list[Solution], *, bound: float,
             deadline: float) -> list[Solution]:
    """Local search from each candidate not already proven optimal, best first."""
    out = []
    for cand in sorted(candidates, key=lambda c: c.makespan_s):
        if cand.status == "optimal":
            break
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        owners = refine_makespan(inst, cand.owners, time_limit_s=left)
        out.append(_solution(inst, owners, f"{cand.method}+local-search", "heuristic", bound))
    return out


def _check_caps_possible(inst: Instance) -> None:
    """InputError at once for caps that no assignment can meet, whatever the method."""
    if inst.caps is None or not inst.memory:
        return
    if max(inst.memory) > max(inst.caps):
        raise _cap_error(inst, "a single layer's state is larger than the cap", proven=True)
    if sum(inst.memory) > sum(inst.caps):
        raise _cap_error(inst, "all layers' state does not fit in the workers' caps together",
                         proven=True)


def _meets(candidates: Sequence[Solution], bound: float, gap: float = 0.0) -> bool:
    """Whether a candidate is within the relative gap (at least OPTIMALITY_GAP) of `bound`."""
    return any(c.makespan_s <= bound * (1 + max(gap, OPTIMALITY_GAP)) for c in candidates)


def _solution(inst: Instance, owners: Sequence[int], method: str, status: str,
              bound: float) -> Solution:
    span = instance_makespan_s(inst, owners)
    if span <= bound * (1 + OPTIMALITY_GAP):
        status = "optimal"
    return Solution(owners=tuple(int(o) for o in owners), method=method, status=status,
                    makespan_s=span, solve_time_s=0.0, lower_bound_s=min(bound, span))


def _cap_error(inst: Instance, reason: str, *, proven: bool = False) -> InputError:
    """The error for an unmet cap; `proven`: the cap itself is known to be infeasible."""
    lower, feasible = smallest_cap_bounds(memory=inst.memory, workers=inst.workers)
    cap = inst.uniform_cap
    if cap is None:  # caps differ per worker
        return InputError(
            f"per-worker memory caps (largest {max(inst.caps)} bytes, {sum(inst.caps)} bytes in "
            f"all) cannot be met with {inst.workers} workers: {reason}; the largest layer state "
            f"is {max(inst.memory)} bytes and all layers hold {sum(inst.memory)} bytes; a common "
            f"cap of {feasible} bytes per worker is feasible (greedy packing by memory)")
    basis = (f"largest layer state {max(inst.memory)} bytes, total state / workers "
             f"{-(-sum(inst.memory) // inst.workers)} bytes")
    if proven and cap + 1 > lower:
        lower = cap + 1
        basis = f"caps up to {cap} bytes are proven infeasible"
    if lower >= feasible:
        hint = f"the smallest cap that works is {feasible} bytes"
    else:
        hint = (f"the smallest cap that could work is at least {lower} bytes ({basis}); "
                f"a cap of {feasible} bytes is feasible (greedy packing by memory)")
    return InputError(f"memory cap {cap} bytes cannot be met with {inst.workers} "
                      f"workers: {reason}; {hint}")
