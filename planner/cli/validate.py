"""`dpkfac validate`: a placement's predicted phases against a run's measured ones, and an
optional profile calibrated from the run."""
from __future__ import annotations

import argparse
import json
import sys

from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import write_json_atomic
from dpkfac.core.placement import load_placement
from dpkfac.core.profile import load_profile, profile_to_dict
from dpkfac.core.strategy import VARIANTS
from planner.cli.common import checked_output, make_console
from planner.model.calibrate import (
    calibrate,
    compare,
    load_run_summary,
    measured_phases,
    predicted_phases,
)
from planner.model.step import placement_split
from planner.report.tables import validation_table


def run(args: argparse.Namespace) -> int:
    """`dpkfac validate`: predicted vs measured per phase; optional calibrated profile."""
    out = checked_output(args.calibrate_out) if args.calibrate_out is not None else None
    placement = load_placement(args.placement)
    profile_path = args.profile or placement["profile"]["path"]
    profile = load_profile(profile_path)
    placement_split(profile, placement, source=f"placement {args.placement!r}")  # checked early
    summary = load_run_summary(args.run)
    if summary["world_size"] != placement["world_size"]:
        raise InputError(f"run {args.run!r} has world_size {summary['world_size']}, placement "
                         f"{args.placement!r} is for {placement['world_size']}")
    staggered = bool(summary.get("staggered_decompositions", False))
    variant = summary.get("variant", "dp-kfac")
    if variant not in VARIANTS:
        raise InputError(f"run summary in {args.run!r}: field variant: expected one of "
                         f"{', '.join(VARIANTS)}, got {variant!r}")
    overlap = summary.get("overlap", False)  # runs before the overlapped step were serial
    measured = measured_phases(summary)
    rows = compare(predicted_phases(profile, placement, variant=variant, staggered=staggered,
                                    overlap=overlap), measured)
    scales = None
    if out is not None:
        calibrated, scales = calibrate(profile, placement, measured, variant=variant,
                                       staggered=staggered, overlap=overlap)
        write_json_atomic(out, profile_to_dict(calibrated))
    if args.format == "json":
        document = {"schema": "dpkfac.validation/1", "placement": args.placement,
                    "run": args.run, "profile": profile_path,
                    "rows": [{"phase": r.phase, "predicted_s": r.predicted_s,
                              "measured_s": r.measured_s, "rel_error": r.rel_error}
                             for r in rows], "calibration_scales": scales}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    console = make_console()
    console.print(validation_table(rows, title=f"{placement['model']} on "
                                               f"{placement['world_size']} worker(s): predicted "
                                               "vs measured, mean over ranks"))
    if out is not None:
        console.print(f"wrote calibrated profile {out}")
    return 0
