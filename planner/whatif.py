"""What-if sweep: predicted step time, traffic and memory per worker count and algorithm."""
from __future__ import annotations

from typing import Sequence

from .algorithms import (ALGORITHMS, dp_kfac_cost, kaisa_comm_opt_cost, kaisa_mem_opt_cost,
                         mpd_kfac_cost, sgd_cost)
from .costmodel import PlanConfig, layer_works_s
from .errors import InputError
from .profile import Profile
from .solvers import solve

WHATIF_SCHEMA_ID = "dpkfac.whatif/1"
ROW_KEYS = ("workers", "algorithm", "step_time_s", "second_order_s", "comm_bytes_per_step",
            "memory_bytes_per_worker")


def whatif_rows(profile: Profile, *, workers: Sequence[int], config: PlanConfig,
                ilp_time_limit_s: float = 2.0, ilp_budget_s: float = 2.0,
                ilp_max_binaries: int = 300, target_gap: float = 0.005) -> list[dict]:
    """One row per (worker count, algorithm in ALGORITHMS), in the order given.

    Row keys: ROW_KEYS (seconds per step, bytes per worker). The dp-kfac row uses the best of
    the heuristics, plus the ILP only for instances with at most `ilp_max_binaries` binary
    variables, stopping within the relative gap `target_gap` of the lower bound (and skipped when
    a heuristic is already within it), each run limited to `ilp_time_limit_s` seconds and all
    runs of the sweep together to `ilp_budget_s` seconds, so a sweep stays fast.
    """
    rows: list[dict] = []
    works = layer_works_s(profile, config=config)
    budget_left = ilp_budget_s
    for p in workers:
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise InputError(f"worker counts must be integers >= 1, got {p!r}")
        round_robin = solve("round-robin", work=works, workers=p).owners
        limit = min(ilp_time_limit_s, budget_left)
        plan = solve("best", work=works, workers=p, time_limit_s=max(limit, 0.01),
                     ilp_max_binaries=ilp_max_binaries if limit >= 0.05 else 0,
                     target_gap=target_gap)
        budget_left -= plan.solve_time_s
        planned = plan.owners
        costs = {
            "sgd": sgd_cost(profile, workers=p),
            "mpd-kfac": mpd_kfac_cost(profile, workers=p, config=config),
            "kaisa-comm-opt": kaisa_comm_opt_cost(profile, workers=p, config=config),
            "kaisa-mem-opt": kaisa_mem_opt_cost(profile, workers=p, config=config),
            "dp-kfac-round-robin": dp_kfac_cost(profile, workers=p, config=config,
                                                owners=round_robin,
                                                algorithm="dp-kfac-round-robin"),
            "dp-kfac": dp_kfac_cost(profile, workers=p, config=config, owners=planned),
        }
        rows.extend(costs[name].as_row() for name in ALGORITHMS)
    return rows
