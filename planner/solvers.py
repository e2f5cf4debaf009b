"""Assigning layers to workers so that the slowest worker finishes first (makespan scheduling).

The problem, in plain numbers: layer l costs ``work[l]`` seconds on a worker of speed 1; worker w
runs at ``speeds[w]`` (a worker of speed 2 does the same work in half the time) and may hold at
most ``memory_cap`` bytes of layer state (``memory[l]`` bytes per layer). Minimise the makespan
``max_w load_w / speeds[w]`` in seconds. Every layer goes to exactly one worker; workers may own
nothing.

Methods: ``round-robin`` (the seed's rule, layer i -> rank i % P), ``greedy`` (longest processing
time first), ``block`` (optimal contiguous blocks in layer order, as SPD-KFAC, by dynamic
programming), ``ilp`` (exact mixed-integer program through PuLP, time limited) and ``best``
(all of them, least makespan wins).

A status of ``optimal`` means proven: either the solver proved it (within a relative gap of
OPTIMALITY_GAP) or the makespan meets a proven lower bound within that gap. ``feasible`` is an
ILP incumbent without proof, ``heuristic`` a heuristic's plan.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pulp

from .errors import InputError

METHODS = ("round-robin", "greedy", "block", "ilp", "best")
HEURISTICS = ("round-robin", "greedy", "block")
OPTIMALITY_GAP = 1e-6  # relative gap under which a plan counts as proven optimal


@dataclass(frozen=True)
class Solution:
    """A layer-to-worker assignment. `owners[l]` is the rank owning layer l.

    makespan_s: max over workers of assigned work / speed, seconds.
    lower_bound_s: a proven lower bound on the optimal makespan for this instance, seconds.
    solve_time_s: wall time spent solving, seconds.
    """
    owners: tuple[int, ...]
    method: str
    status: str
    makespan_s: float
    solve_time_s: float
    lower_bound_s: float = 0.0


@dataclass(frozen=True)
class _Instance:
    work: tuple[float, ...]
    workers: int
    speeds: tuple[float, ...]
    memory: tuple[int, ...]
    memory_cap: int | None


def worker_loads_s(*, work: Sequence[float], owners: Sequence[int], workers: int,
                   speeds: Sequence[float] | None = None) -> tuple[float, ...]:
    """Seconds each worker spends on its layers: sum of its layers' work / its speed."""
    speeds = _speeds(speeds, workers)
    totals = [0.0] * workers
    for w_l, owner in zip(work, owners):
        totals[owner] += w_l
    return tuple(t / s for t, s in zip(totals, speeds))


def makespan_s(*, work: Sequence[float], owners: Sequence[int], workers: int,
               speeds: Sequence[float] | None = None) -> float:
    """The slowest worker's time, seconds (0 when there is no work)."""
    return max(worker_loads_s(work=work, owners=owners, workers=workers, speeds=speeds), default=0.0)


def makespan_lower_bound_s(*, work: Sequence[float], workers: int,
                           speeds: Sequence[float] | None = None) -> float:
    """A proven lower bound on any assignment's makespan, seconds.

    max(total work / sum of speeds, largest layer / fastest speed): the workers together cannot
    beat perfect sharing, and the largest layer must run whole somewhere.
    """
    speeds = _speeds(speeds, workers)
    if not work:
        return 0.0
    return max(sum(work) / sum(speeds), max(work) / max(speeds))


def memory_loads(*, memory: Sequence[int], owners: Sequence[int], workers: int) -> tuple[int, ...]:
    """Bytes of layer state each worker holds."""
    totals = [0] * workers
    for m, owner in zip(memory, owners):
        totals[owner] += int(m)
    return tuple(totals)


def solve(method: str = "best", *, work: Sequence[float], workers: int,
          speeds: Sequence[float] | None = None, memory: Sequence[int] | None = None,
          memory_cap: int | None = None, time_limit_s: float = 10.0,
          ilp_max_binaries: int | None = None, target_gap: float = OPTIMALITY_GAP) -> Solution:
    """Assign layers to workers with `method` (see METHODS), minimising the makespan.

    work: seconds per layer at speed 1. memory: bytes of state per layer; memory_cap: bytes per
    worker. time_limit_s: wall-clock budget of the ILP. ilp_max_binaries: with method "best",
    skip the ILP when it would have more binary variables than this (None: never skip).
    target_gap: relative gap to the lower bound that is good enough: "best" skips the ILP when a
    heuristic is within it, and the ILP stops there (status "optimal" still needs a proof within
    OPTIMALITY_GAP; a looser target trades that proof for speed).
    Raises InputError for bad arguments and for a memory cap no plan can meet (the message names
    the smallest cap that could work).
    """
    start = time.perf_counter()
    inst = _instance(work=work, workers=workers, speeds=speeds, memory=memory,
                     memory_cap=memory_cap)
    if method not in METHODS:
        raise InputError(f"unknown solver {method!r}; expected one of {', '.join(METHODS)}")
    if not (time_limit_s > 0 and math.isfinite(time_limit_s)):
        raise InputError(f"time limit must be a positive number of seconds, got {time_limit_s}")
    if inst.memory_cap is not None and inst.memory:
        if max(inst.memory) > inst.memory_cap:
            raise _cap_error(inst, "a single layer's state is larger than the cap", proven=True)
        if sum(inst.memory) > inst.memory_cap * inst.workers:
            raise _cap_error(inst, "all layers' state does not fit in workers x cap", proven=True)
    bound = makespan_lower_bound_s(work=inst.work, workers=inst.workers, speeds=inst.speeds)

    candidates: list[Solution] = []
    names = HEURISTICS if method in ("best", "ilp") else (method,)
    for name in names:
        owners = _HEURISTIC_FUNCS[name](inst)
        if owners is not None:
            candidates.append(_solution(inst, owners, name, "heuristic", bound))

    ilp_note = ""
    run_ilp = method == "ilp" or (method == "best"
                                  and not _meets(candidates, bound, target_gap)
                                  and (ilp_max_binaries is None
                                       or _binary_count(inst) <= ilp_max_binaries))
    if run_ilp:
        upper = min((c.makespan_s for c in candidates), default=None)
        remaining = max(time_limit_s - (time.perf_counter() - start), 0.1)
        owners, ilp_status, dual = _ilp(inst, time_limit_s=remaining, upper_bound_s=upper,
                                        gap=max(target_gap, OPTIMALITY_GAP))
        if dual is not None:
            bound = max(bound, dual)
        if owners is not None:
            candidates.append(_solution(inst, owners, "ilp", ilp_status, bound))
        elif ilp_status == "infeasible" and not candidates:
            raise _cap_error(inst, "the ILP proved that no assignment fits", proven=True)
        elif not candidates:
            ilp_note = f"the ILP found no assignment within {time_limit_s:g} s"

    if not candidates:
        if ilp_note:
            reason = ilp_note
        elif method == "best":
            reason = (f"no heuristic found an assignment that fits and the ILP was skipped "
                      f"({_binary_count(inst)} binary variables)")
        else:
            reason = f"the {method} solver found no assignment that fits; try --solver best"
        raise _cap_error(inst, reason)
    rank = {"optimal": 0, "feasible": 1, "heuristic": 2}
    best = min(candidates, key=lambda c: (c.makespan_s, rank[c.status]))
    status = "optimal" if best.makespan_s <= bound * (1 + OPTIMALITY_GAP) else best.status
    return Solution(owners=best.owners, method=best.method, status=status,
                    makespan_s=best.makespan_s, solve_time_s=time.perf_counter() - start,
                    lower_bound_s=min(bound, best.makespan_s))


def smallest_cap_bounds(*, memory: Sequence[int], workers: int) -> tuple[int, int]:
    """(lower, feasible) bytes: no cap below `lower` can work; a cap of `feasible` does.

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

def _speeds(speeds: Sequence[float] | None, workers: int) -> tuple[float, ...]:
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


def _instance(*, work, workers, speeds, memory, memory_cap) -> _Instance:
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"number of workers must be an integer >= 1, got {workers!r}")
    work = tuple(float(w) for w in work)
    if not all(w >= 0 and math.isfinite(w) for w in work):
        raise InputError("layer work must be finite non-negative seconds")
    memory = tuple(int(m) for m in memory) if memory is not None else (0,) * len(work)
    if len(memory) != len(work):
        raise InputError(f"expected {len(work)} layer memory sizes, got {len(memory)}")
    if any(m < 0 for m in memory):
        raise InputError("layer memory must be non-negative bytes")
    if memory_cap is not None and memory_cap < 0:
        raise InputError(f"memory cap must be >= 0 bytes, got {memory_cap}")
    workers = int(workers)
    return _Instance(work=work, workers=workers, speeds=_speeds(speeds, workers),
                     memory=memory, memory_cap=memory_cap)


def _fits(inst: _Instance, owners: Sequence[int]) -> bool:
    if inst.memory_cap is None:
        return True
    return max(memory_loads(memory=inst.memory, owners=owners, workers=inst.workers),
               default=0) <= inst.memory_cap


def _meets(candidates: Sequence[Solution], bound: float, gap: float = 0.0) -> bool:
    """Whether a candidate is within the relative gap (at least OPTIMALITY_GAP) of `bound`."""
    return any(c.makespan_s <= bound * (1 + max(gap, OPTIMALITY_GAP)) for c in candidates)


def _solution(inst: _Instance, owners: Sequence[int], method: str, status: str,
              bound: float) -> Solution:
    span = makespan_s(work=inst.work, owners=owners, workers=inst.workers, speeds=inst.speeds)
    if span <= bound * (1 + OPTIMALITY_GAP):
        status = "optimal"
    return Solution(owners=tuple(int(o) for o in owners), method=method, status=status,
                    makespan_s=span, solve_time_s=0.0, lower_bound_s=min(bound, span))


def _round_robin(inst: _Instance) -> tuple[int, ...] | None:
    owners = tuple(i % inst.workers for i in range(len(inst.work)))
    return owners if _fits(inst, owners) else None


def _greedy(inst: _Instance) -> tuple[int, ...] | None:
    """Longest processing time first: each layer to the worker that would finish it earliest."""
    order = sorted(range(len(inst.work)), key=lambda l: (-inst.work[l], -inst.memory[l], l))
    load = [0.0] * inst.workers
    held = [0] * inst.workers
    owners = [0] * len(inst.work)
    cap = inst.memory_cap
    for l in order:
        fitting = [w for w in range(inst.workers) if cap is None or held[w] + inst.memory[l] <= cap]
        if not fitting:
            return None
        w = min(fitting, key=lambda r: ((load[r] + inst.work[l]) / inst.speeds[r], held[r], r))
        owners[l] = w
        load[w] += inst.work[l]
        held[w] += inst.memory[l]
    return tuple(owners)


def _block(inst: _Instance) -> tuple[int, ...] | None:
    """Contiguous blocks in layer order, block j to worker j, min-max by dynamic programming.

    f[j][i] = least makespan of the first i layers on workers 0..j-1
            = min over k <= i of max(f[j-1][k], (W[i] - W[k]) / speed[j-1]),
    with blocks over the memory cap excluded. O(P n^2), vectorised over (i, k).
    """
    n, workers = len(inst.work), inst.workers
    prefix_w = np.concatenate(([0.0], np.cumsum(inst.work)))
    prefix_m = np.concatenate(([0], np.cumsum(np.asarray(inst.memory, dtype=np.int64))))
    block_w = prefix_w[:, None] - prefix_w[None, :]          # [i, k] = work of layers k..i-1
    invalid = np.tri(n + 1, dtype=bool).T & ~np.eye(n + 1, dtype=bool)  # k > i
    if inst.memory_cap is not None:
        invalid |= (prefix_m[:, None] - prefix_m[None, :]) > inst.memory_cap
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    choice = np.zeros((workers, n + 1), dtype=np.int64)
    for j in range(workers):
        cost = np.maximum(f[None, :], block_w / inst.speeds[j])
        cost[invalid] = np.inf
        choice[j] = np.argmin(cost, axis=1)
        f = cost[np.arange(n + 1), choice[j]]
    if not np.isfinite(f[n]):
        return None
    owners = [0] * n
    i = n
    for j in range(workers - 1, -1, -1):
        k = int(choice[j][i])
        for l in range(k, i):
            owners[l] = j
        i = k
    return tuple(owners)


_HEURISTIC_FUNCS = {"round-robin": _round_robin, "greedy": _greedy, "block": _block}


def _allowed_workers(inst: _Instance) -> list[range]:
    """Workers each layer may go to. With identical workers, symmetry is broken: the layer at
    position k in order of decreasing work may only go to workers 0..k (any plan can be
    relabelled so, numbering workers by the first layer they receive)."""
    n = len(inst.work)
    if len(set(inst.speeds)) > 1:
        return [range(inst.workers)] * n
    order = sorted(range(n), key=lambda l: (-inst.work[l], l))
    allowed = [range(inst.workers)] * n
    for position, l in enumerate(order):
        allowed[l] = range(min(inst.workers, position + 1))
    return allowed


def _binary_count(inst: _Instance) -> int:
    return sum(len(r) for r in _allowed_workers(inst))


def _pulp_solver(*, time_limit_s: float, gap: float):
    """HiGHS through highspy when PuLP can reach it, else CBC (installed, or PuLP's bundled)."""
    options = {"msg": False, "timeLimit": time_limit_s, "gapRel": gap, "gapAbs": 1e-9}
    highs = pulp.HiGHS(**options)
    if highs.available():
        return highs
    cbc = pulp.COIN_CMD(**options)
    if cbc.available():
        return cbc
    return pulp.PULP_CBC_CMD(**options)


def _ilp(inst: _Instance, *, time_limit_s: float, upper_bound_s: float | None,
         gap: float = OPTIMALITY_GAP) -> tuple[tuple[int, ...] | None, str, float | None]:
    """Solve the exact MIP. Returns (owners or None, status, proven lower bound seconds or None).

    status: "optimal" (solver proved it within OPTIMALITY_GAP), "feasible" (an incumbent, or
    optimal only within a looser `gap`), "infeasible" (proved),
    "none" (nothing usable). Work is scaled so that the trivial lower bound is 1, memory so that
    the cap is 1, for the solver's tolerances.
    """
    n, workers = len(inst.work), inst.workers
    bound = makespan_lower_bound_s(work=inst.work, workers=workers, speeds=inst.speeds)
    scale = bound if bound > 0 else 1.0
    allowed = _allowed_workers(inst)
    prob = pulp.LpProblem("dpkfac_placement", pulp.LpMinimize)
    x = {(l, w): prob.add_variable(f"x_{l}_{w}", cat=pulp.LpBinary)
         for l in range(n) for w in allowed[l]}
    upper = None if upper_bound_s is None else upper_bound_s / scale * (1 + 1e-9)
    makespan = prob.add_variable("T", lowBound=bound / scale, upBound=upper)
    prob += makespan
    for l in range(n):
        prob += pulp.lpSum(x[l, w] for w in allowed[l]) == 1, f"once_{l}"
    for w in range(workers):
        mine = [l for l in range(n) if (l, w) in x]
        prob += (pulp.lpSum(inst.work[l] / scale * x[l, w] for l in mine)
                 <= inst.speeds[w] * makespan), f"time_{w}"
        if inst.memory_cap is not None and inst.memory_cap > 0:
            prob += (pulp.lpSum(inst.memory[l] / inst.memory_cap * x[l, w] for l in mine)
                     <= 1.0), f"memory_{w}"
        elif inst.memory_cap == 0:
            prob += pulp.lpSum(inst.memory[l] * x[l, w] for l in mine) <= 0, f"memory_{w}"
    try:
        with _native_stdout_silenced():
            prob.solve(_pulp_solver(time_limit_s=time_limit_s, gap=gap))
    except pulp.PulpSolverError:
        return None, "none", None
    dual = _dual_bound(prob)
    dual_s = None if dual is None else max(dual * scale, bound)
    if prob.sol_status == pulp.LpSolutionInfeasible and prob.status == pulp.LpStatusInfeasible:
        return None, "infeasible", None
    if prob.sol_status == pulp.LpSolutionOptimal and gap <= OPTIMALITY_GAP:
        status = "optimal"
    elif prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = "feasible"
    else:
        return None, "none", dual_s
    owners = []
    for l in range(n):
        values = [(x[l, w].varValue or 0.0, w) for w in allowed[l]]
        value, w = max(values)
        if value < 0.5:
            return None, "none", dual_s
        owners.append(w)
    if not _fits(inst, owners):
        return None, "none", dual_s
    if status == "optimal" and dual_s is None:
        # The solver proved optimality within OPTIMALITY_GAP: that is a bound in itself.
        span = makespan_s(work=inst.work, owners=owners, workers=workers, speeds=inst.speeds)
        dual_s = max(span / (1 + OPTIMALITY_GAP), bound)
    return tuple(owners), status, dual_s


@contextlib.contextmanager
def _native_stdout_silenced():
    """Point file descriptor 1 at /dev/null while a native solver runs.

    highspy prints a banner from C++ the first time a Highs object is built, whatever msg says;
    it would corrupt `whatif --format json` on stdout.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _dual_bound(prob: pulp.LpProblem) -> float | None:
    """HiGHS's proven bound on the scaled objective, when the solver exposes it."""
    model = getattr(prob, "solverModel", None)
    try:
        value = float(model.getInfo().mip_dual_bound)
    except Exception:  # noqa: BLE001 - CBC or an older highspy: no bound available
        return None
    return value if math.isfinite(value) else None


def _cap_error(inst: _Instance, reason: str, *, proven: bool = False) -> InputError:
    """The error for an unmet cap; `proven`: the cap itself is known to be infeasible."""
    lower, feasible = smallest_cap_bounds(memory=inst.memory, workers=inst.workers)
    basis = (f"largest layer state {max(inst.memory)} bytes, total state / workers "
             f"{-(-sum(inst.memory) // inst.workers)} bytes")
    if proven and inst.memory_cap + 1 > lower:
        lower = inst.memory_cap + 1
        basis = f"caps up to {inst.memory_cap} bytes are proven infeasible"
    if lower >= feasible:
        hint = f"the smallest cap that works is {feasible} bytes"
    else:
        hint = (f"the smallest cap that could work is at least {lower} bytes ({basis}); "
                f"a cap of {feasible} bytes is feasible (greedy packing by memory)")
    return InputError(f"memory cap {inst.memory_cap} bytes cannot be met with {inst.workers} "
                      f"workers: {reason}; {hint}")
