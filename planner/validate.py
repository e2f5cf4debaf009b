"""Closing the loop: a placement's predicted phases against a training run's measured ones, and
calibration of a profile from that run. Pure functions over plain data; seconds throughout."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .costmodel import PlanConfig
from .errors import InputError
from .jsonio import read_json
from .profile import Profile
from .simulate import PHASES, simulate_cycle

SUMMARY_FIELDS = ("world_size", "mean_step_time_s", "phase_means_by_rank_s")


@dataclass(frozen=True)
class PhaseRow:
    """One phase (or the whole step): predicted and measured seconds, mean over ranks, and the
    relative error (predicted - measured) / measured."""
    phase: str
    predicted_s: float
    measured_s: float

    @property
    def rel_error(self) -> float:
        """Signed relative error of the prediction; 0 when both are 0."""
        if self.measured_s == 0.0:
            return 0.0 if self.predicted_s == 0.0 else float("inf")
        return (self.predicted_s - self.measured_s) / self.measured_s


def load_run_summary(run_dir: str | os.PathLike) -> dict:
    """A training run's summary.json, checked for the fields validation needs."""
    path = Path(run_dir) / "summary.json"
    summary = read_json(path, what="run summary")
    if not isinstance(summary, dict):
        raise InputError(f"run summary {str(path)!r}: expected a JSON object")
    missing = [f for f in SUMMARY_FIELDS if f not in summary]
    if missing:
        raise InputError(f"run summary {str(path)!r}: field {missing[0]}: missing (written by "
                         "`dpkfac train` of this version)")
    if summary["mean_step_time_s"] is None:
        raise InputError(f"run summary {str(path)!r}: field mean_step_time_s: the run has no steps")
    return summary


def placement_owners(placement: Mapping, profile: Profile) -> tuple[int, ...]:
    """Owner rank of each profile layer, in profile order."""
    assignment = placement["assignment"]
    missing = [layer.name for layer in profile.layers if layer.name not in assignment]
    if missing:
        raise InputError(f"placement: field assignment: no owner for profile layer {missing[0]!r}"
                         " (placement and profile are for different models)")
    return tuple(int(assignment[layer.name]) for layer in profile.layers)


def predicted_phases(profile: Profile, placement: Mapping, *,
                     staggered: bool = False) -> dict[str, tuple[float, ...]]:
    """Per phase, per rank: the simulated mean over a cycle, as the executor's timers see it
    (following the placement's decomposition_step schedule when the run was `staggered`)."""
    config = placement["config"]
    slots = placement.get("decomposition_step") if staggered else None
    cycle = simulate_cycle(profile, owners=placement_owners(placement, profile),
                           workers=placement["world_size"],
                           config=PlanConfig(factor_update_freq=config["factor_update_freq"],
                                             inv_update_freq=config["inv_update_freq"]),
                           decomposition_step=None if slots is None else
                           [int(slots.get(layer.name, 0)) for layer in profile.layers])
    phases = cycle.mean_phases()
    phases["step_time"] = (cycle.mean_step_time_s,) * placement["world_size"]
    return phases


def measured_phases(summary: Mapping) -> dict[str, tuple[float, ...]]:
    """Per phase, per rank: the run's steady-state means (summary.json phase_means_by_rank_s)."""
    by_rank: Sequence[Mapping[str, float]] = summary["phase_means_by_rank_s"]
    phases = {phase: tuple(float(rank.get(f"{phase}_s", 0.0)) for rank in by_rank)
              for phase in (*PHASES, "step_time")}
    if not any("apply_s" in rank for rank in by_rank):
        # the executor times no separate apply phase: it is what the step has beyond the others
        timed = [p for p in PHASES if p != "apply"]
        phases["apply"] = tuple(max(step - sum(phases[p][r] for p in timed), 0.0)
                                for r, step in enumerate(phases["step_time"]))
    return phases


def compare(predicted: Mapping[str, Sequence[float]],
            measured: Mapping[str, Sequence[float]]) -> list[PhaseRow]:
    """One row per phase and one for the whole step, each the mean over ranks."""
    return [PhaseRow(phase, float(np.mean(predicted[phase])), float(np.mean(measured[phase])))
            for phase in (*PHASES, "step_time")]


def calibrate(profile: Profile, rows: Sequence[PhaseRow]) -> tuple[Profile, dict[str, float]]:
    """A profile whose costs are scaled so the same placement would predict the measured phases.

    Each compute phase (forward/backward, factors, decompositions, preconditioning, optimizer)
    is scaled by measured / predicted; the collectives' alpha and beta by the same ratio of the
    all-reduce and broadcast phases. Returns the calibrated profile and the scale factors.
    """
    ratio = {row.phase: (row.measured_s / row.predicted_s if row.predicted_s > 0 else 1.0)
             for row in rows}
    measured = {row.phase: row.measured_s for row in rows}
    predicted = {row.phase: row.predicted_s for row in rows}
    layers = tuple(replace(layer,
                           factor_a_s=layer.factor_a_s * ratio["factors"],
                           factor_g_s=layer.factor_g_s * ratio["factors"],
                           decompose_a_s=layer.decompose_a_s * ratio["decompose"],
                           decompose_g_s=layer.decompose_g_s * ratio["decompose"],
                           precondition_s=layer.precondition_s * ratio["precondition"])
                   for layer in profile.layers)
    comm = profile.comm.scaled(allreduce=ratio["allreduce"], broadcast=ratio["broadcast"])
    extra = dict(profile.extra, calibrated={"scales": ratio})
    calibrated = replace(profile, layers=layers, comm=comm, extra=extra,
                         forward_backward_s=profile.forward_backward_s * ratio["forward_backward"],
                         optimizer_s=profile.optimizer_s * ratio["optimizer"],
                         pack_s=_step_cost(profile.pack_s, ratio["allreduce"],
                                           measured["allreduce"], predicted["allreduce"]),
                         apply_s=_step_cost(profile.apply_s, ratio["apply"], measured["apply"],
                                            predicted["apply"]))
    return calibrated, ratio


def _step_cost(old_s: float, ratio: float, measured_s: float, predicted_s: float) -> float:
    """A step-level cost scaled like its phase, or the measured phase when nothing predicted it."""
    return old_s * ratio if predicted_s > 0 else measured_s
