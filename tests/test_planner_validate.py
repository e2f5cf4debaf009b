"""Predicted vs measured phases, calibration arithmetic, and `dpkfac validate` on a recorded run."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from planner import cli as commands
from planner.model.costs import PlanConfig
from planner.placement import make_placement
from dpkfac.core.profile import load_profile, profile_from_dict, profile_to_dict
from dpkfac.core.step import PHASES
from planner.model.calibrate import (PhaseRow, calibrate, compare, measured_phases, predicted_phases)

from planner_fixtures import write_profile


def _placement(tmp_path, workers=2, **config):
    path = write_profile(tmp_path, n_layers=6, world_size=workers)
    profile = load_profile(path)
    placement = make_placement(profile=profile, profile_path=str(path), workers=workers,
                               config=PlanConfig(**config), time_limit_s=1.0)
    return path, profile, placement


def _summary_scaled(predicted: dict, factor: float, workers: int) -> dict:
    by_rank = [{f"{phase}_s": predicted[phase][r] * factor for phase in (*PHASES, "step_time")}
               for r in range(workers)]
    return {"world_size": workers, "mean_step_time_s": by_rank[0]["step_time_s"],
            "phase_means_by_rank_s": by_rank}


def test_phases_add_up_to_the_step_on_every_rank(tmp_path):
    _, profile, placement = _placement(tmp_path, workers=3)
    phases = predicted_phases(profile, placement)
    for rank in range(3):
        total = sum(phases[p][rank] for p in PHASES)
        assert total == pytest.approx(phases["step_time"][rank])


def test_relative_error_and_calibration_arithmetic(tmp_path):
    _, profile, placement = _placement(tmp_path)
    predicted = predicted_phases(profile, placement)
    measured = measured_phases(_summary_scaled(predicted, 1.25, 2))
    rows = compare(predicted, measured)
    for row in rows:
        if row.measured_s > 0:
            assert row.rel_error == pytest.approx(1 / 1.25 - 1)
    calibrated, scales = calibrate(profile, placement, measured)
    for phase in ("factors", "decompose", "precondition", "forward_backward", "optimizer"):
        assert scales[phase] == pytest.approx(1.25)
    assert calibrated.layers[0].decompose_a_s == pytest.approx(1.25 * profile.layers[0].decompose_a_s)
    assert calibrated.comm.broadcast.alpha_s == pytest.approx(
        scales["broadcast"] * profile.comm.broadcast.alpha_s)
    # the calibrated profile now predicts the measured step (every cost scaled alike)
    again = predicted_phases(calibrated, placement)
    assert again["step_time"][0] == pytest.approx(1.25 * predicted["step_time"][0], rel=1e-3)


def test_calibration_separates_waiting_from_communication(tmp_path):
    """Measured: compute as predicted, collectives 3x slower. The phases that hold waiting must
    come back exactly, so the collectives' scale is 3, not the phase ratio."""
    _, profile, placement = _placement(tmp_path, workers=3)
    slow = profile_from_dict(profile_to_dict(replace(
        profile, comm=profile.comm.scaled(allreduce=3.0, broadcast=3.0))))
    measured = predicted_phases(slow, placement, overlap=False)  # the serial step: all-reduce
    calibrated, scales = calibrate(profile, placement, measured, overlap=False)  # not hidden
    assert scales["allreduce"] == pytest.approx(3.0, rel=1e-3)
    assert scales["broadcast"] == pytest.approx(3.0, rel=1e-3)
    again = predicted_phases(calibrated, placement, overlap=False)
    for phase in (*PHASES, "step_time"):
        assert np.mean(again[phase]) == pytest.approx(np.mean(measured[phase]), rel=1e-3,
                                                      abs=1e-12)


def test_phase_row_error_signs():
    assert PhaseRow("x", 1.1, 1.0).rel_error == pytest.approx(0.1)
    assert PhaseRow("x", 0.0, 0.0).rel_error == 0.0


def _recorded_run(tmp_path, profile, placement, factor=1.1):
    run = tmp_path / "run"
    run.mkdir()
    predicted = predicted_phases(profile, placement)
    summary = _summary_scaled(predicted, factor, 2)
    summary["overlap"] = placement["config"]["overlap"]
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_validate_command_on_a_recorded_run(tmp_path, capsys):
    path, profile, placement = _placement(tmp_path)
    placement_path = tmp_path / "placement.json"
    placement_path.write_text(json.dumps(placement))
    run = _recorded_run(tmp_path, profile, placement)
    parser = _parser()
    out = tmp_path / "calibrated.json"
    args = parser.parse_args(["validate", "--placement", str(placement_path), "--run", str(run),
                              "--calibrate-out", str(out), "--format", "json"])
    assert args.func(args) == 0
    document = json.loads(capsys.readouterr().out)
    step = [r for r in document["rows"] if r["phase"] == "step_time"][0]
    assert step["rel_error"] == pytest.approx(1 / 1.1 - 1)
    assert load_profile(out).extra["calibrated"]["scales"]["decompose"] == pytest.approx(1.1)


def test_validate_bad_run_folder_is_an_input_error(tmp_path):
    from dpkfac.core.errors import InputError

    path, profile, placement = _placement(tmp_path)
    placement_path = tmp_path / "placement.json"
    placement_path.write_text(json.dumps(placement))
    args = _parser().parse_args(["validate", "--placement", str(placement_path), "--run",
                                 str(tmp_path / "nope")])
    with pytest.raises(InputError, match="summary"):
        args.func(args)


def _parser():
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser
