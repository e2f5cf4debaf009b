"""The one model of a training step, for every strategy: its time, traffic, memory and compute.

`predict_step` is what `plan` writes into a placement, what `whatif` puts in its rows, what
`validate` compares with a run and what the reports show. Time comes from the event-level
simulation of the executor's cycle (planner.model.simulate, the mean over a cycle); traffic from
the byte formulas the executor counts with (dpkfac.core.step); memory and compute per worker
from the strategy. Seconds per step, bytes per step or per worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from dpkfac.core.errors import InputError
from dpkfac.core.placement import precondition_split
from dpkfac.core.profile import Profile
from dpkfac.core.step import comm_bytes_total
from dpkfac.core.strategy import STRATEGY_OF, FactorMode, SharedResult, Strategy
from planner.model.costs import (
    PlanConfig,
    Split,
    applied_split,
    per_owner,
    precondition_per_worker_s,
    state_bytes_per_worker,
    traffic_by_kind,
)
from planner.model.network import Network
from planner.model.simulate import CycleResult, simulate_cycle
from planner.solve.instance import check_speeds

SPLIT_VARIANT = "dp-kfac"  # the one variant that runs a placement's precondition_split


@dataclass(frozen=True)
class StepPrediction:
    """One variant's predicted step under one placement. Seconds; bytes; tuples by rank.

    compute_s: each worker's amortised K-FAC compute per step (factors, decompositions,
    preconditioning; collectives excluded). state_bytes: each worker's second-order state.
    traffic: bytes one rank sends plus receives per step, by kind (the same on every rank).
    split: the split preconditioning it ran (layer index -> G-side rows per rank; {} when none
    or when the variant ignores splits).
    """
    variant: str
    workers: int
    owners: tuple[int, ...]
    cycle: CycleResult
    traffic: dict[str, float]
    state_bytes: tuple[int, ...]
    compute_s: tuple[float, ...]
    model_grad_bytes: int
    split: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def step_time_s(self) -> float:
        """Mean step over the cycle, seconds."""
        return self.cycle.mean_step_time_s

    @property
    def second_order_s(self) -> float:
        """Mean second-order part over the cycle, seconds."""
        return self.cycle.mean_second_order_s

    @property
    def comm_bytes_per_step(self) -> int:
        """All collectives' bytes one rank sends plus receives per step."""
        return comm_bytes_total(self.traffic)

    @property
    def memory_bytes_per_worker(self) -> int:
        """The busiest worker's gradient and second-order state, bytes."""
        return self.model_grad_bytes + max(self.state_bytes)

    @property
    def layers_owned(self) -> tuple[int, ...]:
        """Layers each rank owns."""
        return tuple(np.bincount(np.asarray(self.owners, dtype=int),
                                 minlength=self.workers).tolist())


def predict_step(profile: Profile, *, variant: str, owners: Sequence[int], workers: int,
                 config: PlanConfig, speeds: Sequence[float] | None = None,
                 network: Network | None = None,
                 decomposition_step: Sequence[int] | None = None,
                 trace: bool = True, split: Split | None = None) -> StepPrediction:
    """Predicted step of `variant` (dpkfac.core.strategy.VARIANTS) with layer i owned by rank
    owners[i] among `workers` ranks of `speeds` (default all 1.0), on `network` (default: the
    profile's measured collectives). trace: find each step's critical path (False for sweeps:
    the same numbers, faster). split: layer index -> rows of its G side each rank
    preconditions (a placement's precondition_split); only the dp-kfac variant runs it, the
    others ignore it (dp-kfac-round-robin is the seed's code, which never splits)."""
    strategy = STRATEGY_OF[variant]
    split = applied_split(split, strategy) if variant == SPLIT_VARIANT else {}
    _check_split(profile, split, workers)
    if len(owners) != len(profile.layers) and strategy is not None:
        raise ValueError(f"{len(owners)} owners for {len(profile.layers)} layers")
    if any(not 0 <= o < workers for o in owners):
        raise ValueError(f"owner rank out of range 0..{workers - 1}")
    owners = tuple(int(o) for o in owners)
    cycle = simulate_cycle(profile, owners=owners, workers=workers, config=config,
                           strategy=strategy, speeds=speeds, network=network,
                           decomposition_step=decomposition_step, trace=trace, split=split)
    return StepPrediction(
        variant=variant, workers=workers, owners=owners, cycle=cycle,
        traffic=traffic_by_kind(profile, strategy=strategy, owners=owners, workers=workers,
                                config=config, split=split),
        state_bytes=state_bytes_per_worker(profile, strategy=strategy, owners=owners,
                                           workers=workers, split=split),
        compute_s=compute_per_worker_s(profile, strategy=strategy, owners=owners,
                                       workers=workers, config=config, speeds=speeds,
                                       split=split),
        model_grad_bytes=profile.model_grad_bytes, split=split)


def _check_split(profile: Profile, split: Mapping[int, tuple[int, ...]], workers: int) -> None:
    """ValueError unless every split layer exists and its rows (one count >= 0 per rank) add
    up to its dim_g."""
    for i, rows in split.items():
        if not 0 <= i < len(profile.layers):
            raise ValueError(f"split layer index {i} out of range 0..{len(profile.layers) - 1}")
        if len(rows) != workers or min(rows) < 0 or sum(rows) != profile.layers[i].dim_g:
            raise ValueError(f"split of layer {profile.layers[i].name!r}: {list(rows)} is not "
                             f"{workers} row counts adding up to dim_g "
                             f"{profile.layers[i].dim_g}")


def compute_per_worker_s(profile: Profile, *, strategy: Strategy | None, owners: Sequence[int],
                         workers: int, config: PlanConfig,
                         speeds: Sequence[float] | None = None,
                         split: Split | None = None) -> tuple[float, ...]:
    """Seconds of K-FAC compute per step on each rank (amortised; collectives excluded). With
    both update periods 1 under DP-KFAC, the sum over a worker's layers of factor_a_s +
    factor_g_s + decompose_a_s + decompose_g_s + precondition_s, divided by its speed; a split
    layer's precondition_s counts rows[r] / dim_g on each rank r instead of on its owner."""
    speeds = check_speeds(speeds, workers)
    split = applied_split(split, strategy)
    if strategy is None:
        return (0.0,) * workers
    layers = profile.layers
    decompose = per_owner([l.decompose_s / config.inv_update_freq for l in layers], owners,
                          workers)
    if strategy.factors is FactorMode.LOCAL:
        factors = per_owner([l.factor_s / config.factor_update_freq for l in layers], owners,
                            workers)
    else:
        factors = [sum(l.factor_s for l in layers) / config.factor_update_freq] * workers
    if strategy.shared is SharedResult.DECOMPOSITION:
        precondition = [sum(l.precondition_s for l in layers)] * workers
    else:
        precondition = precondition_per_worker_s(profile, owners=owners, workers=workers,
                                                 split=split)
    return tuple((f + d + p) / s for f, d, p, s in zip(factors, decompose, precondition, speeds))


def placement_split(profile: Profile, placement: Mapping, *, source: str = "placement"
                    ) -> dict[int, tuple[int, ...]]:
    """The placement's precondition_split as layer index (profile order) -> rows per rank,
    checked against the profile's dim_g ({} when it has none); InputError when it names a
    layer the profile lacks."""
    dims_g = {layer.name: layer.dim_g for layer in profile.layers}
    unknown = [n for n in placement.get("precondition_split") or {} if n not in dims_g]
    if unknown:
        raise InputError(f"{source}: field precondition_split/{unknown[0]}: the profile has no "
                         "such layer (placement and profile are for different models)")
    rows = precondition_split(dict(placement), dims_g=dims_g, source=source)
    index = {name: i for i, name in enumerate(dims_g)}
    return {index[name]: r for name, r in rows.items()}
