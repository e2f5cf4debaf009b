"""The planning pipeline: from a profile and a cluster to a solved, simulated plan.

profile + cluster -> per-layer work (seconds, amortised over the update frequencies) and state
(bytes), per-worker speeds and state caps (bytes) -> solvers.solve -> owners -> the event-level
simulation of the executor's cycle (the predicted step) and, when inv_update_freq > 1, a
staggered decomposition schedule with its own simulation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .cluster import Cluster, cluster_network, state_caps
from .comm import Network
from .costmodel import (PlanConfig, Prediction, common_memory_bytes, layer_state_bytes,
                        layer_works_s, predict)
from .owners import OWNER_MODES, OwnerTrial, search_owners
from .profile import Profile
from .simulate import CycleResult, simulate_cycle
from .solvers import DEFAULT_ILP_MAX_BINARIES, Solution, solve
from .stagger import per_slot_makespan_s, stagger_decompositions


@dataclass(frozen=True)
class Staggered:
    """A staggered decomposition schedule: slots[i] in 0..K-1 for layer i; the busiest worker's
    compute per slot, seconds, staggered and as the executor runs it (all in slot 0); and the
    simulated cycle under the staggered schedule."""
    slots: tuple[int, ...]
    per_step_makespan_s: tuple[float, ...]
    executor_per_step_makespan_s: tuple[float, ...]
    cycle: CycleResult


@dataclass(frozen=True)
class Plan:
    """A solved placement with its predictions. caps: per-worker state caps in bytes (None: no
    cap); common_bytes: what every worker holds besides its layers' state."""
    profile: Profile
    cluster: Cluster
    config: PlanConfig
    network: Network | None
    caps: tuple[int, ...] | None
    common_bytes: int
    solution: Solution
    prediction: Prediction
    cycle: CycleResult
    staggered: Staggered | None
    time_limit_s: float
    method: str
    owner_trials: tuple[OwnerTrial, ...] = ()  # the owner search's counts ("auto" only)


def make_plan(*, profile: Profile, cluster: Cluster, config: PlanConfig, method: str = "best",
              memory_cap: int | None = None, time_limit_s: float = 10.0,
              ilp_max_binaries: int | None = DEFAULT_ILP_MAX_BINARIES,
              broadcast_mode: str = "collective", owners: str = "auto") -> Plan:
    """Solve and simulate. memory_cap: bytes of second-order state per worker (on top of the
    cluster's per-worker memory, if any). time_limit_s: solver budget, seconds. owners: "auto"
    (with the best solver, also try fewer owners and keep the shortest predicted step;
    planner.owners) or "all" (the solvers' placement as is)."""
    if owners not in OWNER_MODES:
        raise ValueError(f"owners must be one of {OWNER_MODES}, got {owners!r}")
    workers = cluster.workers
    network = cluster_network(cluster)
    common = common_memory_bytes(profile, workers=workers)
    caps = state_caps(cluster, common_bytes=common, memory_cap=memory_cap)
    speeds = cluster.speeds
    work, memory = layer_works_s(profile, config=config), layer_state_bytes(profile)
    solution = solve(method, work=work, workers=workers, speeds=speeds, memory=memory,
                     memory_cap=caps, time_limit_s=time_limit_s,
                     ilp_max_binaries=ilp_max_binaries)
    trials: tuple[OwnerTrial, ...] = ()
    if owners == "auto" and method == "best" and workers > 1:
        def step_time_of(candidate) -> float:
            return simulate_cycle(profile, owners=candidate, workers=workers, config=config,
                                  speeds=speeds, network=network,
                                  broadcast_mode=broadcast_mode).mean_step_time_s

        solution, trials = search_owners(solution, step_time_of=step_time_of, work=work,
                                         speeds=speeds, memory=memory, caps=caps,
                                         time_limit_s=min(time_limit_s, 1.0))
    plan = evaluate(profile=profile, cluster=cluster, config=config, solution=solution,
                    network=network, caps=caps, common_bytes=common, time_limit_s=time_limit_s,
                    method=method, broadcast_mode=broadcast_mode)
    return replace(plan, owner_trials=trials)


def evaluate(*, profile: Profile, cluster: Cluster, config: PlanConfig, solution: Solution,
             network: Network | None, caps, common_bytes: int, time_limit_s: float, method: str,
             broadcast_mode: str = "collective") -> Plan:
    """Predict, simulate and stagger a solved assignment."""
    workers, speeds, owners = cluster.workers, cluster.speeds, solution.owners
    prediction = predict(profile, owners=owners, workers=workers, config=config, speeds=speeds,
                         compute_bound_s=solution.lower_bound_s, network=network)
    cycle = simulate_cycle(profile, owners=owners, workers=workers, config=config, speeds=speeds,
                           network=network, broadcast_mode=broadcast_mode)
    staggered = None
    if config.inv_update_freq > 1:
        slots = stagger_decompositions(profile, owners=owners, workers=workers, config=config)
        staggered = Staggered(
            slots=slots,
            per_step_makespan_s=per_slot_makespan_s(profile, owners=owners, workers=workers,
                                                    config=config, slots=slots, speeds=speeds),
            executor_per_step_makespan_s=per_slot_makespan_s(
                profile, owners=owners, workers=workers, config=config, slots=None,
                speeds=speeds),
            cycle=simulate_cycle(profile, owners=owners, workers=workers, config=config,
                                 speeds=speeds, network=network, decomposition_step=slots,
                                 broadcast_mode=broadcast_mode))
    return Plan(profile=profile, cluster=cluster, config=config, network=network, caps=caps,
                common_bytes=common_bytes, solution=solution, prediction=prediction,
                cycle=cycle, staggered=staggered, time_limit_s=time_limit_s, method=method)
