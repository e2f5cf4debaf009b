"""The planning pipeline: from a profile and a cluster to a solved, predicted DP-KFAC plan.

profile + cluster -> per-layer work (seconds, amortised over the update frequencies) and state
(bytes), per-worker speeds and state caps (bytes) -> planner.solve.solvers.solve -> owners ->
the relabel pass (below) -> the owner search (fewer owners when that predicts a shorter step
than the labelled placement over all workers) -> the split pass (share the
preconditioning of the heaviest layers across all workers when that predicts a shorter step;
planner.solve.split) -> the relabel pass (among interchangeable workers, the owner groups that
finish preconditioning first take the low ranks, whose broadcasts go first, when that predicts
a shorter step; planner.solve.relabel) -> the step model's prediction (planner.model.step)
and, when inv_update_freq > 1, a staggered decomposition schedule with its own prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from dpkfac.core.cluster import Cluster, flat_cluster
from dpkfac.core.errors import InputError
from dpkfac.core.profile import Profile
from dpkfac.core.strategy import DP_KFAC
from planner.model.costs import (
    PlanConfig,
    common_memory_bytes,
    layer_state_bytes,
    layer_works_s,
    second_order_lower_bound_s,
    state_bytes_per_worker,
)
from planner.model.network import Network
from planner.model.stagger import per_slot_makespan_s, stagger_decompositions
from planner.model.step import StepPrediction, compute_per_worker_s, predict_step
from planner.model.topology import cluster_network, state_caps
from planner.solve.names import DEFAULT_ILP_MAX_BINARIES, OWNER_MODES
from planner.solve.owners import OwnerTrial, search_owners
from planner.solve.relabel import search_relabel
from planner.solve.solvers import Solution, solve
from planner.solve.split import SplitTrial, search_split, split_candidates


@dataclass(frozen=True)
class Staggered:
    """A staggered decomposition schedule: slots[i] in 0..K-1 for layer i; the busiest worker's
    compute per slot, seconds, staggered and unstaggered (all in slot 0); and the step
    prediction under the staggered schedule."""
    slots: tuple[int, ...]
    per_step_makespan_s: tuple[float, ...]
    executor_per_step_makespan_s: tuple[float, ...]
    prediction: StepPrediction

    @property
    def cycle(self):
        """The simulated cycle under the staggered schedule."""
        return self.prediction.cycle


@dataclass(frozen=True)
class RelabelTrial:
    """The relabel pass on the final owners: the predicted mean step before and after
    (seconds; equal when it kept the labels) and whether it renamed any worker."""
    step_time_s_before: float
    step_time_s_after: float
    applied: bool


@dataclass(frozen=True)
class Plan:
    """A solved placement with its prediction. caps: per-worker state caps in bytes (None: no
    cap); common_bytes: what every worker holds besides its layers' state; lower_bound_s: a
    proven lower bound on the amortised second-order seconds of any placement (split ones too
    when the split pass ran); split: layer index -> G-side rows per rank of the layers whose
    preconditioning every worker shares ({}: none); split_trials: the split pass's trials."""
    profile: Profile
    cluster: Cluster
    config: PlanConfig
    network: Network | None
    caps: tuple[int, ...] | None
    common_bytes: int
    solution: Solution
    prediction: StepPrediction
    lower_bound_s: float
    staggered: Staggered | None
    time_limit_s: float
    method: str
    owner_trials: tuple[OwnerTrial, ...] = ()  # the owner search's counts ("auto" only)
    split: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    split_trials: tuple[SplitTrial, ...] = ()
    relabel: RelabelTrial | None = None  # the relabel pass's outcome (None: not run)

    @property
    def cycle(self):
        """The simulated cycle of the plan's step."""
        return self.prediction.cycle


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


def make_plan(*, profile: Profile, cluster: Cluster, config: PlanConfig, method: str = "best",
              memory_cap: int | None = None, time_limit_s: float = 10.0,
              ilp_max_binaries: int | None = DEFAULT_ILP_MAX_BINARIES,
              owners: str = "auto", split: bool = True) -> Plan:
    """Solve and predict. memory_cap: bytes of second-order state per worker (on top of the
    cluster's per-worker memory, if any). time_limit_s: solver budget, seconds. owners: "auto"
    (with the best solver, also try fewer owners and keep the shortest predicted step;
    planner.solve.owners) or "all" (the solvers' placement as is). split: after the owners are
    final, on more than one worker, also try splitting the heaviest layers' preconditioning
    across all workers (planner.solve.split) and keep what shortens the predicted step by more
    than 0.5% while every worker's state (the split layers' decompositions the non-owners then
    hold included) stays within its cap."""
    if owners not in OWNER_MODES:
        raise ValueError(f"owners must be one of {OWNER_MODES}, got {owners!r}")
    workers = cluster.workers
    network = cluster_network(cluster, hosts=profile.comm)
    common = common_memory_bytes(profile, workers=workers)
    caps = state_caps(cluster, common_bytes=common, memory_cap=memory_cap)
    work, memory = layer_works_s(profile, config=config), layer_state_bytes(profile)
    solution = solve(method, work=work, workers=workers, speeds=cluster.speeds, memory=memory,
                     memory_cap=caps, time_limit_s=time_limit_s,
                     ilp_max_binaries=ilp_max_binaries)
    trials: tuple[OwnerTrial, ...] = ()
    if owners == "auto" and method == "best" and workers > 1:
        # labelled first: broadcasts go in rank order, so the labels change the step the
        # owner search compares fewer owners with
        labelled, _, changed = _relabel_pass(profile, solution.owners, {}, config=config,
                                             speeds=cluster.speeds, network=network, caps=caps)
        if changed:
            solution = replace(solution, owners=labelled)
        solution, trials = _fewer_owners(profile, solution, config=config, speeds=cluster.speeds,
                                         network=network, caps=caps,
                                         time_limit_s=min(time_limit_s, 1.0))
    splittable = split and workers > 1
    shared = dict(profile=profile, cluster=cluster, config=config, solution=solution,
                  network=network, caps=caps, common_bytes=common, time_limit_s=time_limit_s,
                  method=method, splittable=splittable)
    plan = evaluate(**shared)
    if splittable:
        chosen, split_trials = _split_pass(profile, solution.owners, config=config,
                                           speeds=cluster.speeds, network=network, caps=caps)
        if chosen:
            plan = evaluate(**shared, split=chosen)
        plan = replace(plan, split_trials=split_trials)
    if workers > 1:
        owners_, split_, changed = _relabel_pass(profile, plan.solution.owners, plan.split,
                                                 config=config, speeds=cluster.speeds,
                                                 network=network, caps=caps)
        before = plan.cycle.mean_step_time_s
        if changed:
            shared["solution"] = replace(solution, owners=owners_)
            plan = replace(evaluate(**shared, split=split_), split_trials=plan.split_trials)
        plan = replace(plan, relabel=RelabelTrial(before, plan.cycle.mean_step_time_s, changed))
    return replace(plan, owner_trials=trials)


def _relabel_pass(profile: Profile, owners: Sequence[int], split, *, config: PlanConfig,
                  speeds: Sequence[float], network: Network | None, caps
                  ) -> tuple[tuple[int, ...], dict[int, tuple[int, ...]], bool]:
    """planner.solve.relabel.search_relabel with the step model's DP-KFAC mean step and each
    worker's mean precondition end (seconds) over the cycle."""
    workers = len(speeds)

    def evaluate(candidate, rows) -> tuple[float, tuple[float, ...]]:
        cycle = predict_step(profile, variant="dp-kfac", owners=candidate, workers=workers,
                             config=config, speeds=speeds, network=network, trace=False,
                             split=rows).cycle
        return cycle.mean_step_time_s, cycle.mean_per_worker("precondition_end_s")

    return search_relabel(owners, split, speeds=speeds, caps=caps, evaluate=evaluate)


def _split_pass(profile: Profile, owners: Sequence[int], *, config: PlanConfig,
                speeds: Sequence[float], network: Network | None, caps
                ) -> tuple[dict[int, tuple[int, ...]], tuple[SplitTrial, ...]]:
    """planner.solve.split.search_split with the step model's DP-KFAC compute per worker and
    mean step (seconds) under the final owners; a split must keep every worker's state (the
    split layers' decompositions included) within its cap (bytes; None: no caps)."""
    workers = len(speeds)
    layers = profile.layers

    def compute_of(split) -> tuple[float, ...]:
        return compute_per_worker_s(profile, strategy=DP_KFAC, owners=owners, workers=workers,
                                    config=config, speeds=speeds, split=split)

    def step_time_of(split) -> float:
        return predict_step(profile, variant="dp-kfac", owners=owners, workers=workers,
                            config=config, speeds=speeds, network=network, trace=False,
                            split=split).step_time_s

    def fits(split) -> bool:
        held = state_bytes_per_worker(profile, strategy=DP_KFAC, owners=owners,
                                      workers=workers, split=split)
        return caps is None or all(h <= c for h, c in zip(held, caps))

    precondition = [l.precondition_s for l in layers]
    dims_g = [l.dim_g for l in layers]
    return search_split(candidates=split_candidates(precondition, dims_g, workers=workers),
                        precondition_s=precondition, dims_g=dims_g, owners=owners,
                        speeds=speeds, compute_of=compute_of, step_time_of=step_time_of,
                        fits=fits)


def _fewer_owners(profile: Profile, solution: Solution, *, config: PlanConfig,
                  speeds: Sequence[float], network: Network | None, caps,
                  time_limit_s: float) -> tuple[Solution, tuple[OwnerTrial, ...]]:
    """The owner search with the step model's DP-KFAC step time as its objective."""
    workers = len(speeds)

    def step_time_of(candidate) -> float:
        return predict_step(profile, variant="dp-kfac", owners=candidate, workers=workers,
                            config=config, speeds=speeds, network=network,
                            trace=False).step_time_s

    return search_owners(solution, step_time_of=step_time_of,
                         work=layer_works_s(profile, config=config), speeds=speeds,
                         memory=layer_state_bytes(profile), caps=caps,
                         time_limit_s=time_limit_s)


def plan_owners(profile: Profile, *, workers: int, config: PlanConfig,
                network: Network | None = None, time_limit_s: float = 0.05) -> tuple[int, ...]:
    """The planner's owners for a what-if point, fast: the best of the heuristics and local
    search (the ILP only on small instances), so a 1..4096 sweep stays within seconds; with at
    least as many workers as layers every layer first gets its own worker (the compute makespan
    then meets its lower bound, the largest layer); then the relabel pass, the owner search and
    the relabel pass again."""
    works = layer_works_s(profile, config=config)
    if workers >= len(profile.layers):
        full = Solution(owners=tuple(range(len(profile.layers))), method="one layer each",
                        status="heuristic", makespan_s=max(works, default=0.0),
                        solve_time_s=0.0)
    else:
        full = solve("best", work=works, workers=workers, time_limit_s=time_limit_s,
                     ilp_max_binaries=300)
    if workers == 1:
        return full.owners
    speeds = (1.0,) * workers
    labelled, _, _ = _relabel_pass(profile, full.owners, {}, config=config, speeds=speeds,
                                   network=network, caps=None)
    best, _ = _fewer_owners(profile, replace(full, owners=labelled), config=config,
                            speeds=speeds, network=network, caps=None,
                            time_limit_s=time_limit_s)
    owners, _, _ = _relabel_pass(profile, best.owners, {}, config=config, speeds=speeds,
                                 network=network, caps=None)
    return owners


def evaluate(*, profile: Profile, cluster: Cluster, config: PlanConfig, solution: Solution,
             network: Network | None, caps, common_bytes: int, time_limit_s: float,
             method: str, splittable: bool = False,
             split: Mapping[int, tuple[int, ...]] | None = None) -> Plan:
    """Predict and stagger a solved assignment, with `split` (layer index -> rows per rank)
    when given. splittable: the lower bound covers placements with split layers too."""
    workers, speeds, owners = cluster.workers, cluster.speeds, solution.owners
    split = dict(split or {})
    common = dict(variant="dp-kfac", owners=owners, workers=workers, config=config,
                  speeds=speeds, network=network, split=split)
    prediction = predict_step(profile, **common)
    bound = second_order_lower_bound_s(profile, workers=workers, config=config, speeds=speeds,
                                       compute_bound_s=solution.lower_bound_s, network=network,
                                       split=splittable or bool(split))
    staggered = None
    if config.inv_update_freq > 1:
        mine = dict(profile=profile, owners=owners, workers=workers, config=config, split=split)
        slots = stagger_decompositions(**mine)
        staggered = Staggered(
            slots=slots,
            per_step_makespan_s=per_slot_makespan_s(**mine, slots=slots, speeds=speeds),
            executor_per_step_makespan_s=per_slot_makespan_s(**mine, slots=None,
                                                             speeds=speeds),
            prediction=predict_step(profile, **common, decomposition_step=slots))
    return Plan(profile=profile, cluster=cluster, config=config, network=network, caps=caps,
                common_bytes=common_bytes, solution=solution, prediction=prediction,
                lower_bound_s=bound, staggered=staggered, time_limit_s=time_limit_s,
                method=method, split=split)
