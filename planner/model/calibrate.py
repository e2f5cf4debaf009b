"""Closing the loop: a placement's predicted phases against a training run's measured ones, and
calibration of a profile from that run. Pure functions over plain data; seconds throughout."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import read_json
from dpkfac.core.placement import owners_by_layer
from dpkfac.core.profile import Profile
from dpkfac.core.step import PHASES
from planner.model.costs import PlanConfig
from planner.model.step import placement_split, predict_step

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


def predicted_phases(profile: Profile, placement: Mapping, *, variant: str = "dp-kfac",
                     staggered: bool = False, overlap: bool | None = None
                     ) -> dict[str, tuple[float, ...]]:
    """Per phase, per rank: the step model's mean over a cycle of `variant` under the
    placement's owners, as the executor's timers see it (following the placement's
    decomposition_step schedule when the run was `staggered`; overlapped or serial as
    `overlap` says, default the placement's config, overlapped when it says nothing; with the
    placement's precondition_split, which dp-kfac runs and the other variants ignore)."""
    config = placement["config"]
    names = [layer.name for layer in profile.layers]
    slots = placement.get("decomposition_step") if staggered else None
    prediction = predict_step(
        profile, variant=variant, owners=owners_by_layer(placement, names),
        workers=placement["world_size"],
        config=PlanConfig(factor_update_freq=config["factor_update_freq"],
                          inv_update_freq=config["inv_update_freq"],
                          overlap=config.get("overlap", True) if overlap is None else overlap),
        decomposition_step=None if slots is None else [int(slots.get(n, 0)) for n in names],
        split=placement_split(profile, placement))
    phases = prediction.cycle.mean_phases()
    phases["step_time"] = (prediction.step_time_s,) * placement["world_size"]
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


COMPUTE_PHASES = ("forward_backward", "factors", "decompose", "precondition", "apply",
                  "optimizer")
COMM_PHASES = ("allreduce", "broadcast")


def calibrate(profile: Profile, placement: Mapping, measured: Mapping[str, Sequence[float]], *,
              variant: str = "dp-kfac", staggered: bool = False, overlap: bool | None = None,
              max_rounds: int = 30, tolerance: float = 1e-4) -> tuple[Profile, dict[str, float]]:
    """A profile scaled so that the same placement predicts the measured phases.

    Compute phases (forward/backward, factors, decompositions, preconditioning, apply,
    optimizer) have no waiting in them: each is scaled by measured / predicted (means over
    ranks). The all-reduce and broadcast phases also hold waiting for the slowest rank, which
    the compute scales already set; each collective's scale is then solved for (secant steps:
    the phase grows linearly with it while the critical path stays) until its phase agrees
    within `tolerance` (never below 1e-3: a phase measured shorter than the waiting the
    simulation puts in it cannot be matched). Returns the profile and the scale factors.
    """
    want = _phase_means(measured)
    mode = dict(variant=variant, staggered=staggered, overlap=overlap)
    have = _phase_means(predicted_phases(profile, placement, **mode))
    scales = {phase: _ratio(want[phase], have[phase]) for phase in COMPUTE_PHASES}
    scales.update(dict.fromkeys(COMM_PHASES, 1.0))

    def phase_at(phase: str, scale: float) -> float:
        trial = _scaled_profile(profile, dict(scales, **{phase: scale}), want, have)
        return _phase_means(predicted_phases(trial, placement, **mode))[phase]

    for phase in COMM_PHASES:
        scales[phase] = _solve_increasing(lambda s, p=phase: phase_at(p, s), want[phase],
                                          rounds=max_rounds, tolerance=tolerance)
    calibrated = _scaled_profile(profile, scales, want, have)
    extra = dict(profile.extra, calibrated={"scales": scales})
    return replace(calibrated, extra=extra), scales


def _phase_means(phases: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {phase: float(np.mean(phases[phase])) for phase in (*PHASES, "step_time")}


def _solve_increasing(f, target: float, *, rounds: int, tolerance: float,
                      floor: float = 1e-3) -> float:
    """x >= floor with f(x) == target for a nondecreasing, piecewise-linear f, by secant steps
    from x = 1 (the best x found when it cannot be met)."""
    x0, y0 = 1.0, f(1.0)
    x1 = max(x0 * _ratio(target, y0), floor)
    y1 = f(x1)
    for _ in range(rounds):
        if abs(y1 - target) <= tolerance * max(target, 1e-12) or x1 == x0:
            break
        slope = (y1 - y0) / (x1 - x0)
        if slope <= 0:
            break
        x0, y0 = x1, y1
        x1 = max(x1 + (target - y1) / slope, floor)
        y1 = f(x1)
    return x1


def _ratio(measured_s: float, predicted_s: float) -> float:
    return measured_s / predicted_s if predicted_s > 0 else 1.0


def _scaled_profile(profile: Profile, scales: Mapping[str, float], measured: Mapping[str, float],
                    predicted: Mapping[str, float]) -> Profile:
    """`profile` with each phase's costs times its scale (the gradient buckets' ready times
    with forward/backward's)."""
    layers = tuple(replace(layer,
                           factor_a_s=layer.factor_a_s * scales["factors"],
                           factor_g_s=layer.factor_g_s * scales["factors"],
                           decompose_a_s=layer.decompose_a_s * scales["decompose"],
                           decompose_g_s=layer.decompose_g_s * scales["decompose"],
                           precondition_s=layer.precondition_s * scales["precondition"])
                   for layer in profile.layers)
    apply_s = (profile.apply_s * scales["apply"] if profile.apply_s > 0
               else measured["apply"])  # nothing predicted it: take the measurement
    scaled = replace(profile, layers=layers,
                     comm=profile.comm.scaled(allreduce=scales["allreduce"],
                                              broadcast=scales["broadcast"]),
                     optimizer_s=profile.optimizer_s * scales["optimizer"],
                     pack_s=profile.pack_s, apply_s=apply_s)
    return scaled.forward_backward_scaled(scales["forward_backward"])
