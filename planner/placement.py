"""The placement file (schema dpkfac.placement/1): making it, reading it, checking it."""
from __future__ import annotations

import os
from typing import Any, Sequence

from .cluster import Cluster, flat_cluster
from .costmodel import PlanConfig
from .errors import InputError
from .jsonio import file_sha256, read_json, validate
from .plan import Plan, make_plan
from .profile import Profile
from .schemas import PLACEMENT_SCHEMA, PLACEMENT_SCHEMA_ID, placement_ranks_schema
from .solvers import DEFAULT_ILP_MAX_BINARIES


def make_placement(*, profile: Profile, profile_path: str | os.PathLike, workers: int | None,
                   method: str = "best", config: PlanConfig, memory_cap: int | None = None,
                   time_limit_s: float = 10.0, speeds: Sequence[float] | None = None,
                   cluster: Cluster | None = None,
                   ilp_max_binaries: int | None = DEFAULT_ILP_MAX_BINARIES,
                   broadcast_mode: str = "collective", owners: str = "auto") -> dict:
    """Solve the placement of `profile` on `workers` ranks (or on `cluster`) and return the
    placement document.

    memory_cap: bytes of second-order state allowed per worker (None: no cap).
    time_limit_s: seconds the solvers may run. speeds: relative worker speeds (default all 1.0;
    with a cluster, the cluster's). Predicted times are seconds per step, memory in bytes
    (CONTRACTS.md). owners: "auto" (also try fewer owners, planner.owners) or "all".
    """
    cluster = resolve_cluster(workers=workers, speeds=speeds, cluster=cluster)
    plan = make_plan(profile=profile, cluster=cluster, config=config, method=method,
                     memory_cap=memory_cap, time_limit_s=time_limit_s,
                     ilp_max_binaries=ilp_max_binaries, broadcast_mode=broadcast_mode,
                     owners=owners)
    return placement_document(plan, profile_path=profile_path, memory_cap=memory_cap)


def resolve_cluster(*, workers: int | None, speeds: Sequence[float] | None,
                    cluster: Cluster | None) -> Cluster:
    """The cluster to plan for: `cluster` (its size must agree with `workers` if given; speeds
    come from the file), else a flat cluster of `workers` workers with `speeds`."""
    if cluster is None:
        if workers is None:
            raise InputError("give --workers N or --cluster FILE")
        return flat_cluster(workers=workers, speeds=speeds)
    if workers is not None and workers != cluster.workers:
        raise InputError(f"--workers {workers} does not match {cluster.source} "
                         f"({cluster.workers} workers)")
    if speeds is not None:
        raise InputError(f"worker speeds come from {cluster.source}; drop --speeds")
    return cluster


def placement_document(plan: Plan, *, profile_path: str | os.PathLike,
                       memory_cap: int | None = None) -> dict:
    """The dpkfac.placement/1 document of a plan (CONTRACTS.md fields and more)."""
    profile, solution, pred, cycle = plan.profile, plan.solution, plan.prediction, plan.cycle
    workers = plan.cluster.workers
    busy, idle, comm_s = (cycle.mean_per_worker(f) for f in ("busy_s", "idle_s", "comm_s"))
    per_worker = [
        {"rank": rank, "compute_s": pred.compute_s[rank], "memory_bytes": pred.memory_bytes[rank],
         "total_memory_bytes": pred.memory_bytes[rank] + plan.common_bytes,
         "memory_cap_bytes": plan.caps[rank] if plan.caps is not None else None,
         "speed": plan.cluster.speeds[rank],
         "busy_s": busy[rank], "comm_s": comm_s[rank], "idle_s": idle[rank],
         "layers": pred.layers_owned[rank], "broadcast_bytes": pred.broadcast_bytes[rank],
         "comm_bytes": pred.comm_bytes[rank]}
        for rank in range(workers)
    ]
    worst = cycle.steps[cycle.worst_step]
    second_order = cycle.mean_second_order_s
    doc = {
        "schema": PLACEMENT_SCHEMA_ID,
        "model": profile.model,
        "world_size": workers,
        "profile": {"path": str(profile_path), "sha256": file_sha256(profile_path)},
        "solver": solution.method,
        "status": solution.status,
        "config": {"factor_update_freq": plan.config.factor_update_freq,
                   "inv_update_freq": plan.config.inv_update_freq,
                   "batch_size": profile.batch_size,
                   "compute_method": profile.compute_method},
        "assignment": {layer.name: owner for layer, owner in zip(profile.layers, solution.owners)},
        "predicted": {
            "step_time_s": cycle.mean_step_time_s,
            "second_order_s": second_order,
            "lower_bound_s": min(pred.lower_bound_s, second_order),
            "compute_makespan_s": pred.compute_makespan_s,
            "broadcast_s": pred.broadcast_s,
            "allreduce_s": pred.allreduce_s,
            "forward_backward_s": profile.forward_backward_s,
            "optimizer_s": profile.optimizer_s,
            "comm_bytes_per_step": max(pred.comm_bytes),
            "common_memory_bytes": plan.common_bytes,
            "amortised_second_order_s": pred.second_order_s,
            "method": "event-level simulation of the executor's cycle (planner.simulate), "
                      "mean over the cycle",
            "cycle": {"steps": len(cycle.steps),
                      "step_time_s": [s.step_time_s for s in cycle.steps],
                      "second_order_s": [s.second_order_s for s in cycle.steps],
                      "compute_makespan_s": [s.compute_makespan_s for s in cycle.steps]},
            "critical_path": [seg.as_dict() for seg in worst.critical_path],
            "per_worker": per_worker,
        },
        "planner": {
            "requested_solver": plan.method,
            "solve_time_s": solution.solve_time_s,
            "time_limit_s": plan.time_limit_s,
            "ilp": solution.ilp,
            "memory_cap_bytes": memory_cap,
            "speeds": list(plan.cluster.speeds),
            "network": plan.network.source if plan.network is not None else "profile",
            "cluster": plan.cluster.source,
            "owners": len(set(solution.owners)),
            "owner_search": [{"owners": t.owners, "step_time_s": t.step_time_s}
                             for t in plan.owner_trials],
        },
    }
    if plan.staggered is not None:
        st = plan.staggered
        doc["decomposition_step"] = {layer.name: k for layer, k in zip(profile.layers, st.slots)}
        doc["predicted"]["staggered"] = {
            "honoured_by_executor": "with dpkfac train --stagger-decompositions",
            "step_time_s": st.cycle.mean_step_time_s,
            "second_order_s": st.cycle.mean_second_order_s,
            "per_step_makespan_s": list(st.per_step_makespan_s),
            "executor_per_step_makespan_s": list(st.executor_per_step_makespan_s),
        }
    return doc


def load_placement(source: str | os.PathLike | dict) -> dict:
    """Read (unless given a dict) and check a placement document; return it.

    Checks the schema, then (with a schema made for its world_size) that every assigned rank and
    per-worker rank is < world_size, then that no per-worker rank appears twice.
    Raises InputError naming the file, the field and what was expected.
    """
    if isinstance(source, dict):
        doc, where = source, "placement"
    else:
        doc, where = read_json(source, what="placement"), f"placement {str(source)!r}"
    if not isinstance(doc, dict):
        raise InputError(f"{where}: (top level): expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != PLACEMENT_SCHEMA_ID and "schema" in doc:
        raise InputError(f"{where}: field schema: expected {PLACEMENT_SCHEMA_ID!r}, "
                         f"got {doc.get('schema')!r}")
    validate(doc, PLACEMENT_SCHEMA, source=where)
    world = doc["world_size"]
    validate(doc, placement_ranks_schema(world), source=where,
             explain=lambda rank: f"rank {rank!r} is out of range for world_size {world} "
                                  f"(expected 0..{world - 1})")
    seen: set[int] = set()
    for i, entry in enumerate(doc["predicted"]["per_worker"]):
        rank = entry["rank"]
        if rank in seen:
            raise InputError(f"{where}: field predicted/per_worker/{i}/rank: rank {rank} "
                             f"appears twice")
        seen.add(rank)
    return doc


def check_placement_matches(placement: dict, *, layer_names: Sequence[str],
                            world_size: int | None, source: Any = "placement") -> None:
    """InputError unless the placement assigns exactly `layer_names` and has `world_size`.

    world_size None skips the world-size check. `source` names the placement in messages.
    """
    assigned = set(placement["assignment"])
    wanted = set(layer_names)
    missing = [n for n in layer_names if n not in assigned]
    unknown = [n for n in placement["assignment"] if n not in wanted]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model layer(s) not in the placement: {_few(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} placement layer(s) not in the model: {_few(unknown)}")
        raise InputError(f"{source}: field assignment: does not match the model's K-FAC layers "
                         f"({'; '.join(parts)})")
    if world_size is not None and placement["world_size"] != world_size:
        raise InputError(f"{source}: field world_size: the placement is for "
                         f"{placement['world_size']} workers but this run has {world_size}")


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
