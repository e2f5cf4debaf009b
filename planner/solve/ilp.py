"""The exact placement as a mixed-integer program through PuLP (HiGHS via highspy, else CBC).

Variables x[l, w] = 1 when worker w owns layer l, and the makespan T:
    minimise T  s.t.  sum_w x[l, w] = 1,  sum_l work_l x[l, w] <= speed_w T,
                      sum_l memory_l x[l, w] <= cap_w.
With identical workers (same speed, same cap) symmetry is broken: the layer at position k in order
of decreasing work may only go to workers 0..k. The solver is warm-started from a given plan and
T is bounded above by that plan's makespan, so the ILP never returns anything worse. A second,
optional phase keeps T at its optimum and minimises the largest per-worker memory (the secondary
objective that balances memory). Status "optimal" only when the solution status says the solver
proved it: CBC and HiGHS at a time limit still report the problem as "Optimal".
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import pulp

from planner.solve.bounds import makespan_lower_bound_s
from planner.solve.instance import Instance, fits, instance_makespan_s

OPTIMALITY_GAP = 1e-6  # relative gap under which a plan counts as proven optimal


@dataclass(frozen=True)
class IlpResult:
    """owners (None if nothing usable), status ("optimal", "feasible", "infeasible", "none"),
    dual_bound_s (a proven lower bound on the makespan, seconds, or None), solver name."""
    owners: tuple[int, ...] | None
    status: str
    dual_bound_s: float | None
    solver: str


def allowed_workers(inst: Instance) -> list[range]:
    """Workers each layer may go to. With identical workers the layer at position k in order of
    decreasing work may only go to workers 0..k (any plan can be relabelled so, numbering workers
    by the first layer they receive)."""
    n = len(inst.work)
    if not inst.identical_workers:
        return [range(inst.workers)] * n
    order = sorted(range(n), key=lambda l: (-inst.work[l], l))
    allowed = [range(inst.workers)] * n
    for position, l in enumerate(order):
        allowed[l] = range(min(inst.workers, position + 1))
    return allowed


def binary_count(inst: Instance) -> int:
    """Number of binary variables of the program (after symmetry breaking)."""
    return sum(len(r) for r in allowed_workers(inst))


def relabel_for_symmetry(inst: Instance, owners: Sequence[int]) -> tuple[int, ...]:
    """The same plan with workers renumbered in order of the first (largest) layer they get, so
    it satisfies the symmetry-breaking constraints; only for identical workers."""
    if not inst.identical_workers:
        return tuple(owners)
    order = sorted(range(len(inst.work)), key=lambda l: (-inst.work[l], l))
    label: dict[int, int] = {}
    for l in order:
        label.setdefault(owners[l], len(label))
    for w in range(inst.workers):
        label.setdefault(w, len(label))
    return tuple(label[o] for o in owners)


def solve_ilp(inst: Instance, *, time_limit_s: float, warm_start: Sequence[int] | None = None,
              gap: float = OPTIMALITY_GAP, balance_memory: bool = True) -> IlpResult:
    """Solve the program within `time_limit_s` seconds (both phases together).

    warm_start: a plan that fits the caps; its makespan bounds T from above. gap: relative gap
    at which the solver may stop (status "optimal" needs gap <= OPTIMALITY_GAP).
    Work is scaled so that the lower bound is 1 and memory so that each cap is 1, for the
    solver's tolerances.
    """
    start = time.perf_counter()
    n, workers = len(inst.work), inst.workers
    bound = makespan_lower_bound_s(work=inst.work, workers=workers, speeds=inst.speeds)
    scale = bound if bound > 0 else 1.0
    allowed = allowed_workers(inst)
    prob = pulp.LpProblem("dpkfac_placement", pulp.LpMinimize)
    x = {(l, w): prob.add_variable(f"x_{l}_{w}", cat=pulp.LpBinary)
         for l in range(n) for w in allowed[l]}
    warm = relabel_for_symmetry(inst, warm_start) if warm_start is not None else None
    upper = None
    if warm is not None:
        upper = instance_makespan_s(inst, warm) / scale * (1 + 1e-9)
    makespan = prob.add_variable("T", lowBound=bound / scale, upBound=upper)
    prob += makespan
    mine = [[] for _ in range(workers)]
    for (l, w) in x:
        mine[w].append(l)
    for l in range(n):
        prob += pulp.lpSum(x[l, w] for w in allowed[l]) == 1, f"once_{l}"
    for w in range(workers):
        prob += (pulp.lpSum(inst.work[l] / scale * x[l, w] for l in mine[w])
                 <= inst.speeds[w] * makespan), f"time_{w}"
        if inst.caps is not None:
            cap = inst.caps[w]
            prob += (pulp.lpSum(inst.memory[l] / max(cap, 1) * x[l, w] for l in mine[w])
                     <= cap / max(cap, 1)), f"memory_{w}"
    if warm is not None:
        for (l, w), var in x.items():
            var.setInitialValue(1.0 if warm[l] == w else 0.0)
        makespan.setInitialValue(min(max(instance_makespan_s(inst, warm) / scale,
                                         makespan.lowBound), upper), check=False)
    solver_name, status, dual_s = _run(prob, time_limit_s=time_limit_s, gap=gap,
                                       warm=warm is not None)
    if dual_s is not None:
        dual_s = max(dual_s * scale, bound)
    if status in ("infeasible", "none"):
        return IlpResult(None, status, dual_s, solver_name)
    owners = _read_owners(x, allowed, n)
    if owners is None or not fits(inst, owners):
        return IlpResult(None, "none", dual_s, solver_name)
    span = instance_makespan_s(inst, owners)
    if status == "optimal" and dual_s is None:
        # the solver proved optimality within OPTIMALITY_GAP: that is a bound in itself
        dual_s = max(span / (1 + OPTIMALITY_GAP), bound)
    left = time_limit_s - (time.perf_counter() - start)
    if (balance_memory and status == "optimal" and any(inst.memory) and workers > 1
            and left > 0.05):
        balanced = _balance_memory_phase(prob, x, makespan, inst, owners=owners, span=span,
                                         scale=scale, allowed=allowed, time_limit_s=left)
        if balanced is not None:
            owners = balanced
    return IlpResult(tuple(owners), status, dual_s, solver_name)


def _balance_memory_phase(prob, x, makespan, inst: Instance, *, owners, span: float,
                          scale: float, allowed, time_limit_s: float) -> list[int] | None:
    """Second phase: T fixed at its optimum, minimise the largest per-worker memory."""
    total = float(sum(inst.memory)) or 1.0
    peak = prob.add_variable("M", lowBound=0)
    makespan.upBound = span / scale * (1 + 1e-9)
    for w in range(inst.workers):
        prob += (pulp.lpSum(inst.memory[l] / total * x[l, w]
                            for l in range(len(inst.work)) if (l, w) in x) <= peak), f"peak_{w}"
    prob.setObjective(peak)
    for (l, w), var in x.items():
        var.setInitialValue(1.0 if owners[l] == w else 0.0)
    _, status, _ = _run(prob, time_limit_s=time_limit_s, gap=1e-4, warm=True)
    if status not in ("optimal", "feasible"):
        return None
    result = _read_owners(x, allowed, len(inst.work))
    if (result is None or not fits(inst, result)
            or instance_makespan_s(inst, result) > span * (1 + 1e-9)):
        return None
    return result


def _read_owners(x, allowed, n: int) -> list[int] | None:
    owners = []
    for l in range(n):
        value, w = max(((x[l, w].varValue or 0.0), w) for w in allowed[l])
        if value < 0.5:
            return None
        owners.append(w)
    return owners


def _run(prob: pulp.LpProblem, *, time_limit_s: float, gap: float,
         warm: bool) -> tuple[str, str, float | None]:
    """Solve; returns (solver name, "optimal" | "feasible" | "infeasible" | "none", scaled dual
    bound or None)."""
    solver, name = pulp_solver(time_limit_s=time_limit_s, gap=gap, warm=warm)
    try:
        with native_stdout_silenced():
            prob.solve(solver)
    except pulp.PulpSolverError:
        return name, "none", None
    dual = _dual_bound(prob)
    if prob.sol_status == pulp.LpSolutionInfeasible and prob.status == pulp.LpStatusInfeasible:
        return name, "infeasible", None
    if prob.sol_status == pulp.LpSolutionOptimal and gap <= OPTIMALITY_GAP:
        return name, "optimal", dual
    if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return name, "feasible", dual
    return name, "none", dual


def pulp_solver(*, time_limit_s: float, gap: float, warm: bool):
    """(solver, name): HiGHS through highspy when PuLP can reach it, else CBC (installed, or
    PuLP's bundled). Warm starts: HiGHS gets the start through setSolution, CBC its own way."""
    options = {"msg": False, "timeLimit": max(time_limit_s, 0.01), "gapRel": gap, "gapAbs": 1e-9}
    highs = _WarmHiGHS(**options) if _highs_class() is not None else None
    if highs is not None and highs.available():
        highs.use_warm_start = warm
        return highs, "highs"
    cbc = pulp.COIN_CMD(warmStart=warm, **options)
    if cbc.available():
        return cbc, "cbc"
    return pulp.PULP_CBC_CMD(warmStart=warm, **options), "cbc"


def _highs_class():
    return pulp.HiGHS if hasattr(pulp.HiGHS, "callSolver") else None


class _WarmHiGHS(pulp.HiGHS):
    """pulp.HiGHS that hands the variables' initial values to HiGHS as a starting solution."""
    use_warm_start = False

    def callSolver(self, lp):  # noqa: N802 - PuLP's API
        if self.use_warm_start:
            import highspy
            values = [float(v.varValue) if v.varValue is not None else 0.0
                      for v in lp.variables()]
            solution = highspy.HighsSolution()
            solution.col_value = values
            solution.value_valid = True
            with contextlib.suppress(Exception):
                lp.solverModel.setSolution(solution)
        lp.solverModel.run()


@contextlib.contextmanager
def native_stdout_silenced():
    """Point file descriptor 1 at /dev/null while a native solver runs (highspy prints a banner
    from C++ whatever msg says; it would corrupt `whatif --format json` on stdout)."""
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
