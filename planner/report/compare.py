"""`dpkfac plan --compare`: every solver on the same profile and cluster, side by side."""
from __future__ import annotations

from dpkfac.core.cluster import Cluster
from dpkfac.core.errors import InputError
from dpkfac.core.profile import Profile
from planner.model.costs import PlanConfig
from planner.plan import make_plan
from planner.solve.names import METHODS


def compare_rows(*, profile: Profile, cluster: Cluster, config: PlanConfig,
                 memory_cap: int | None, time_limit_s: float,
                 ilp_max_binaries: int | None, owners: str = "auto",
                 split: bool = True) -> list[dict]:
    """One row per method in METHODS (keys: see planner.report.compare_table). Seconds, bytes.
    A method that finds no plan within the caps gets an `error` instead of numbers. owners and
    split: as make_plan's (the "best" row then shows the placement `dpkfac plan` writes)."""
    rows = []
    for method in METHODS:
        try:
            plan = make_plan(profile=profile, cluster=cluster, config=config, method=method,
                             memory_cap=memory_cap, time_limit_s=time_limit_s,
                             ilp_max_binaries=ilp_max_binaries, owners=owners, split=split)
        except InputError as exc:
            rows.append({"solver": method, "error": str(exc)})
            continue
        sol = plan.solution
        rows.append({"solver": method, "winner": sol.method, "makespan_s": sol.makespan_s,
                     "lower_bound_s": sol.lower_bound_s,
                     "second_order_s": plan.cycle.mean_second_order_s,
                     "step_time_s": plan.cycle.mean_step_time_s, "status": sol.status,
                     "solve_time_s": sol.solve_time_s,
                     "max_memory_bytes": max(plan.prediction.state_bytes), "error": None})
    return rows
