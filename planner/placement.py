"""Writing the placement file (schema dpkfac.placement/1) of a plan. Reading and checking one is
dpkfac.core.placement's, so the executor needs no solver."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dpkfac.core.cluster import Cluster
from dpkfac.core.jsonio import file_sha256
from dpkfac.core.profile import Profile
from dpkfac.core.schemas import PLACEMENT_SCHEMA_ID
from planner.model.costs import PlanConfig, decomposition_sizes, per_owner, unsplit_mask
from planner.plan import Plan, make_plan, resolve_cluster
from planner.solve.names import DEFAULT_ILP_MAX_BINARIES


def make_placement(*, profile: Profile, profile_path: str | os.PathLike, workers: int | None,
                   method: str = "best", config: PlanConfig, memory_cap: int | None = None,
                   time_limit_s: float = 10.0, speeds: Sequence[float] | None = None,
                   cluster: Cluster | None = None,
                   ilp_max_binaries: int | None = DEFAULT_ILP_MAX_BINARIES,
                   owners: str = "auto", split: bool = True) -> dict:
    """Solve the placement of `profile` on `workers` ranks (or on `cluster`) and return the
    placement document.

    memory_cap: bytes of second-order state allowed per worker (None: no cap).
    time_limit_s: seconds the solvers may run. speeds: relative worker speeds (default all 1.0;
    with a cluster, the cluster's). owners: "auto" (also try fewer owners) or "all". split:
    also try splitting the heaviest layers' preconditioning across all workers
    (precondition_split; False: never).
    """
    cluster = resolve_cluster(workers=workers, speeds=speeds, cluster=cluster)
    plan = make_plan(profile=profile, cluster=cluster, config=config, method=method,
                     memory_cap=memory_cap, time_limit_s=time_limit_s,
                     ilp_max_binaries=ilp_max_binaries, owners=owners, split=split)
    return placement_document(plan, profile_path=profile_path, memory_cap=memory_cap)


def placement_document(plan: Plan, *, profile_path: str | os.PathLike | None = None,
                       profile_ref: dict | None = None, memory_cap: int | None = None) -> dict:
    """The dpkfac.placement/1 document of a plan (CONTRACTS.md fields and more). Its predicted
    seconds and bytes are the step model's (planner.model.step), as the what-if's. The profile
    is named by its file (`profile_path`: path and SHA-256 of its bytes) or by `profile_ref`
    ({"path", "sha256"}, e.g. of a profile held in memory)."""
    if profile_ref is None:
        profile_ref = {"path": str(profile_path), "sha256": file_sha256(profile_path)}
    profile, solution = plan.profile, plan.solution
    doc = {
        "schema": PLACEMENT_SCHEMA_ID,
        "model": profile.model,
        **{k: profile.extra[k] for k in ("data", "loss") if k in profile.extra},
        "world_size": plan.cluster.workers,
        "profile": dict(profile_ref),
        "solver": solution.method,
        "status": solution.status,
        "config": {"factor_update_freq": plan.config.factor_update_freq,
                   "inv_update_freq": plan.config.inv_update_freq,
                   "overlap": plan.config.overlap,
                   "batch_size": profile.batch_size,
                   "compute_method": profile.compute_method},
        "assignment": {layer.name: owner for layer, owner in zip(profile.layers, solution.owners)},
        "predicted": _predicted(plan),
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
            "split_search": [{"layer": profile.layers[t.layer].name, "rows": list(t.rows),
                              "step_time_s": t.step_time_s, "kept": t.kept}
                             for t in plan.split_trials],
            **({} if plan.relabel is None else {"relabel": {
                "applied": plan.relabel.applied,
                "step_time_s_before": plan.relabel.step_time_s_before,
                "step_time_s_after": plan.relabel.step_time_s_after}}),
        },
    }
    if plan.split:
        doc["precondition_split"] = {profile.layers[i].name: list(plan.split[i])
                                     for i in sorted(plan.split)}
    if plan.staggered is not None:
        st = plan.staggered
        doc["decomposition_step"] = {layer.name: k for layer, k in zip(profile.layers, st.slots)}
        doc["predicted"]["staggered"] = {
            "honoured_by_executor": "with dpkfac train --stagger-decompositions",
            "step_time_s": st.prediction.step_time_s,
            "second_order_s": st.prediction.second_order_s,
            "per_step_makespan_s": list(st.per_step_makespan_s),
            "executor_per_step_makespan_s": list(st.executor_per_step_makespan_s),
        }
    return doc


def broadcast_bytes_per_worker(plan: Plan) -> tuple[int, ...]:
    """Bytes each rank broadcasts per step as an owner (payloads, counters excluded): its
    unsplit layers' preconditioned gradients every step and its split layers' decompositions
    every inv_update_freq steps (amortised). The split layers' all-reduce is not a broadcast."""
    profile, pred = plan.profile, plan.prediction
    whole = unsplit_mask(profile, plan.split)
    grads = np.asarray([layer.grad_numel * profile.dtype_bytes for layer in profile.layers],
                       dtype=float)
    decomps = np.asarray(decomposition_sizes(profile), dtype=float) / plan.config.inv_update_freq
    sent = per_owner(np.where(whole, grads, decomps), pred.owners, pred.workers)
    return tuple(int(round(v)) for v in sent)


def _predicted(plan: Plan) -> dict:
    """The `predicted` section: the step, its parts, the cycle, the critical path, per worker."""
    pred, cycle, profile = plan.prediction, plan.prediction.cycle, plan.profile
    busy, idle, comm_s = (cycle.mean_per_worker(f) for f in ("busy_s", "idle_s", "comm_s"))
    sent = broadcast_bytes_per_worker(plan)
    owned = pred.layers_owned
    per_worker = [
        {"rank": rank, "compute_s": pred.compute_s[rank], "memory_bytes": pred.state_bytes[rank],
         "total_memory_bytes": pred.state_bytes[rank] + plan.common_bytes,
         "memory_cap_bytes": plan.caps[rank] if plan.caps is not None else None,
         "speed": plan.cluster.speeds[rank],
         "busy_s": busy[rank], "comm_s": comm_s[rank], "idle_s": idle[rank],
         "layers": owned[rank], "broadcast_bytes": int(sent[rank]),
         "comm_bytes": pred.comm_bytes_per_step}
        for rank in range(pred.workers)]
    worst = cycle.steps[cycle.worst_step]
    mean = lambda name: sum(getattr(s, name) for s in cycle.steps) / len(cycle.steps)  # noqa: E731
    return {
        "step_time_s": pred.step_time_s,
        "second_order_s": pred.second_order_s,
        "lower_bound_s": min(plan.lower_bound_s, pred.second_order_s),
        "compute_makespan_s": max(pred.compute_s),
        "broadcast_s": mean("broadcast_s"),
        "allreduce_s": mean("allreduce_s"),
        "forward_backward_s": profile.forward_backward_s,
        "optimizer_s": profile.optimizer_s,
        "comm_bytes_per_step": pred.comm_bytes_per_step,
        "comm_bytes_by_kind": dict(pred.traffic),
        "common_memory_bytes": plan.common_bytes,
        "method": "planner.model.step: event-level simulation of the executor's cycle, "
                  "mean over the cycle",
        "cycle": {"steps": len(cycle.steps),
                  "step_time_s": [s.step_time_s for s in cycle.steps],
                  "second_order_s": [s.second_order_s for s in cycle.steps],
                  "compute_makespan_s": [s.compute_makespan_s for s in cycle.steps]},
        "critical_path": [seg.as_dict() for seg in worst.critical_path],
        "per_worker": per_worker,
    }
