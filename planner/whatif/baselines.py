"""DP-KFAC and the algorithms it is compared with: who owns which layer, and one what-if row.

Each variant (dpkfac.core.strategy.VARIANTS) is predicted by the one step model
(planner.model.step.predict_step) under the owners it picks by itself:

* mpd-kfac: decompositions spread by longest processing time on their measured times;
* kaisa-comm-opt / kaisa-mem-opt: LPT on KAISA's d^3 estimate (dim_a^3 + dim_g^3);
* dp-kfac-round-robin: layer i on rank i mod P (the seed's code);
* dp-kfac: the planner's placement (planner.plan.plan_owners).

Any of them can be given owners instead (e.g. a placement's, or the owners a run used): the
row is then the placement's own prediction, seconds and bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from dpkfac.core.profile import Profile
from dpkfac.core.step import TRAFFIC_KINDS
from dpkfac.core.strategy import VARIANTS
from planner.model.costs import PlanConfig, layer_works_s
from planner.model.network import Network
from planner.model.step import StepPrediction, predict_step
from planner.solve.solvers import solve

ALGORITHMS = VARIANTS


@dataclass(frozen=True)
class AlgorithmCost:
    """One algorithm's predicted step at one worker count (a what-if row). Seconds; bytes per
    worker. second_order_compute_s: the busiest worker's K-FAC compute per step (amortised);
    second_order_memory_bytes: the busiest worker's second-order state; comm_bytes_by_kind:
    traffic per TRAFFIC_KINDS kind (sums to comm_bytes_per_step)."""
    workers: int
    algorithm: str
    step_time_s: float
    second_order_s: float
    comm_bytes_per_step: int
    memory_bytes_per_worker: int
    second_order_compute_s: float = 0.0
    second_order_memory_bytes: int = 0
    comm_bytes_by_kind: dict = field(default_factory=dict)

    @classmethod
    def of(cls, prediction: StepPrediction, *, algorithm: str | None = None) -> "AlgorithmCost":
        """The row of a step prediction."""
        return cls(workers=prediction.workers, algorithm=algorithm or prediction.variant,
                   step_time_s=prediction.step_time_s,
                   second_order_s=prediction.second_order_s,
                   comm_bytes_per_step=prediction.comm_bytes_per_step,
                   memory_bytes_per_worker=prediction.memory_bytes_per_worker,
                   second_order_compute_s=max(prediction.compute_s),
                   second_order_memory_bytes=max(prediction.state_bytes),
                   comm_bytes_by_kind=dict(prediction.traffic))

    def as_row(self) -> dict:
        """The what-if row (CONTRACTS.md keys first, then the breakdown) as a plain dict."""
        row = dataclasses.asdict(self)
        kinds = row.pop("comm_bytes_by_kind")
        row.update({f"comm_{kind}_bytes": kinds.get(kind, 0) for kind in TRAFFIC_KINDS})
        return row


def default_owners(profile: Profile, *, algorithm: str, workers: int, config: PlanConfig,
                   network: Network | None = None) -> tuple[int, ...]:
    """The owners an algorithm picks by itself (dp-kfac: the planner's placement)."""
    if algorithm == "sgd":
        return ()
    if algorithm == "mpd-kfac":
        return solve("greedy", work=[l.decompose_s for l in profile.layers],
                     workers=workers).owners
    if algorithm.startswith("kaisa"):
        return kaisa_owners(profile, workers=workers)
    if algorithm == "dp-kfac-round-robin":
        return solve("round-robin", work=layer_works_s(profile, config=config),
                     workers=workers).owners
    from planner.plan import plan_owners  # the pipeline imports this module's rows

    return plan_owners(profile, workers=workers, config=config, network=network)


def kaisa_owners(profile: Profile, *, workers: int) -> tuple[int, ...]:
    """KAISA's assignment: greedy LPT on the estimated decomposition cost dim_a^3 + dim_g^3."""
    return solve("greedy", work=[float(l.dim_a ** 3 + l.dim_g ** 3) for l in profile.layers],
                 workers=workers).owners


def algorithm_cost(profile: Profile, *, algorithm: str, workers: int, config: PlanConfig,
                   owners: Sequence[int] | None = None,
                   network: Network | None = None,
                   split: Mapping[int, tuple[int, ...]] | None = None) -> AlgorithmCost:
    """Predicted step of `algorithm` (ALGORITHMS) at `workers` ranks; owners default to the
    algorithm's own choice (default_owners); split: layer index -> rows per rank (a
    placement's precondition_split; DP-KFAC variants run it, the others ignore it). The
    planner's own dp-kfac owners here come unsplit (plan_owners)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if owners is None or algorithm == "sgd":
        owners = default_owners(profile, algorithm=algorithm, workers=workers, config=config,
                                network=network)
    prediction = predict_step(profile, variant=algorithm, owners=owners, workers=workers,
                              config=config, network=network, trace=False, split=split)
    return AlgorithmCost.of(prediction)
