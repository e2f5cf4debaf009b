"""Prediction fidelity: profile -> plan -> train -> validate on this machine, per model and
worker count; predicted vs measured step time and the error. Also checks that the planner ranks
two placements as the measurement does.

Each row profiles under the same launch as its training run (torchrun with P processes, one
thread each), so kernels are measured under the same contention they meet in training. Two
predictions per row, both against the same measured run:
* "profile": from the measured profile alone;
* "calibrated": the loop closed, from the profile calibrated (`dpkfac validate --calibrate-out`)
  on an earlier, separate training run of the same setting; the placement is re-planned from
  the calibrated profile and that plan is what the measured run trains.
Exits 1 when any calibrated row's |error| exceeds --max-error (default 10%; the goal is a 5%
mean) or any profile-only row's exceeds --max-profile-error (default 25%: a guard against
regressions of the model itself; on this shared 2-core machine the profile-only rows ran
from +4% to -26% in four runs, moving by up to 15 points run to run, because collectives in
training have longer tails than when profiled alone and 4 ranks share 2 cores).
The ranking check must agree too.

Each training run lasts at least --min-run-seconds (default 8 s, by the plan's predicted step
time) and at least --steps steps: digits-mlp steps take 3-13 ms, and 300 of them (1-4 s) gave
means that moved by up to 13% between two runs of the same plan.

    python bench/fidelity.py [--models digits-cnn,digits-mlp] [--workers 1,2,4] [--steps 300]
                             [--docs-out docs/results/fidelity.md | --no-docs]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from common import ResultsDoc, add_docs_arguments, docs_out, dpkfac_command, rich_table, run_timed

RANKING_MODEL, RANKING_WORKERS = "resnet20", 2


def profile_and_plan(work: Path, model: str, workers: int, batch_size: int,
                     solver: str = "best") -> tuple[Path, Path]:
    """Profile `model` under `workers` processes and plan for them; (profile, placement)."""
    profile = work / f"{model}-p{workers}.profile.json"
    if not profile.exists():
        run_timed(dpkfac_command(workers, "profile", "--model", model, "--batch-size",
                                 str(batch_size), "--out", str(profile)))
    placement = work / f"{model}-p{workers}-{solver}.placement.json"
    run_timed(dpkfac_command(1, "plan", "--profile", str(profile), "--workers", str(workers),
                             "--solver", solver, "--out", str(placement)))
    return profile, placement


def train(work: Path, placement: Path, workers: int, steps: int, tag: str,
          min_seconds: float = 0.0) -> Path:
    """Train under the placement for `steps` steps, or more when the placement's predicted step
    time says they would take less than `min_seconds` (a mean of heavy-tailed step times needs
    seconds of samples, not a count); the run folder."""
    predicted_s = json.loads(placement.read_text())["predicted"]["step_time_s"]
    steps = max(steps, math.ceil(min_seconds / predicted_s)) if predicted_s > 0 else steps
    run = work / f"{placement.stem}.{tag}.run"
    run_timed(dpkfac_command(workers, "train", "--placement", str(placement), "--out", str(run),
                             "--max-steps", str(steps), "--epochs", "1000", "--no-progress"))
    return run


def validate(placement: Path, run: Path, *, profile: Path | None = None,
             calibrate_out: Path | None = None) -> dict:
    """`dpkfac validate`'s rows by phase (and a calibrated profile when asked)."""
    extra = ["--profile", str(profile)] if profile else []
    extra += ["--calibrate-out", str(calibrate_out)] if calibrate_out else []
    _, out = run_timed(dpkfac_command(1, "validate", "--placement", str(placement), "--run",
                                      str(run), "--format", "json", *extra), capture=True)
    return {row["phase"]: row for row in json.loads(out)["rows"]}


def closed_loop_row(work: Path, model: str, workers: int, args) -> tuple[dict, dict]:
    """Validate rows of one setting: (profile-only prediction, calibrated prediction), both
    against the same measured run, which trains the plan made from the calibrated profile."""
    profile, placement = profile_and_plan(work, model, workers, args.batch_size)
    calibration_run = train(work, placement, workers, args.steps, "calibration",
                            args.min_run_seconds)
    calibrated = work / f"{model}-p{workers}.calibrated.json"
    validate(placement, calibration_run, calibrate_out=calibrated)
    replanned = work / f"{model}-p{workers}.calibrated.placement.json"
    run_timed(dpkfac_command(1, "plan", "--profile", str(calibrated), "--workers", str(workers),
                             "--out", str(replanned)))
    run = train(work, replanned, workers, args.steps, "measured", args.min_run_seconds)
    return validate(replanned, run, profile=profile), validate(replanned, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,digits-mlp")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--min-run-seconds", type=float, default=8.0,
                        help="more steps than --steps when a run would be shorter than this")
    parser.add_argument("--max-error", type=float, default=0.10)
    parser.add_argument("--skip-ranking", action="store_true")
    parser.add_argument("--max-profile-error", type=float, default=0.25,
                        help="bar for the profile-only predictions")
    add_docs_arguments(parser, "fidelity")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpkfac-fidelity-"))
    title = "Predicted vs measured step time (profile -> plan -> train -> validate)"
    headers = ["model", "workers", "measured", "profile-only", "error", "calibrated", "error",
               "worst phase (calibrated)"]
    left = ("model", "worst phase (calibrated)")
    cells, raw_errors, errors = [], [], []
    for model in args.models.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            raw_rows, rows = closed_loop_row(work, model, workers, args)
            raw, step = raw_rows["step_time"], rows["step_time"]
            raw_errors.append(raw["rel_error"])
            errors.append(step["rel_error"])
            cells.append([model, str(workers), _ms(step["measured_s"]), _ms(raw["predicted_s"]),
                          f"{100 * raw['rel_error']:+.1f}%", _ms(step["predicted_s"]),
                          f"{100 * step['rel_error']:+.1f}%", _worst_phase(rows)])
    console = Console(width=120)
    console.print(rich_table(title, headers, cells, left=left))
    lines, failures = [], []
    for name, values, bar in (("profile-only", raw_errors, args.max_profile_error),
                              ("calibrated", errors, args.max_error)):
        mean, worst = statistics.fmean(abs(e) for e in values), max(abs(e) for e in values)
        lines.append(f"{name}: mean |error| {100 * mean:.1f}% (goal 5%), worst {100 * worst:.1f}%"
                     f" (bar {100 * bar:.0f}%)")
        console.print(lines[-1])
        if worst > bar:
            failures.append(f"{name}: worst |error| {100 * worst:.1f}% > {100 * bar:.0f}%")
    doc = ResultsDoc("fidelity", "Prediction fidelity: predicted vs measured step time",
                     floors=_floors_text(args))
    doc.text("Per row: profile under the same launch (torchrun with `workers` processes, one "
             "thread each), plan, a calibration run, `dpkfac validate --calibrate-out`, re-plan "
             "from the calibrated profile, then a measured run of that plan. profile-only: "
             "predicted from the measured profile alone; calibrated: from the profile "
             f"calibrated on the earlier, separate run. Runs of at least {args.steps} steps and "
             f"{args.min_run_seconds:g} s; errors are (predicted - measured) / measured.")
    doc.table(headers, cells, title=title, left=left, note="; ".join(lines) + ".")
    if not args.skip_ranking:
        same, ranking = ranking_check(work, args, console)
        ranking_title, ranking_headers, ranking_cells = ranking
        doc.table(ranking_headers, ranking_cells, title=ranking_title, left=("placement",),
                  note="ranking agrees" if same else "ranking DISAGREES")
        if not same:
            failures.append(f"ranking: {RANKING_MODEL} on {RANKING_WORKERS} workers, the "
                            "placement predicted faster is measured slower")
    doc.write(docs_out(args), failures)
    shutil.rmtree(work, ignore_errors=True)
    print("FAIL" if failures else "ok")
    return 1 if failures else 0


def _floors_text(args) -> str:
    return (f"The bench exits 1 when any calibrated row's |error| exceeds {args.max_error:.0%} "
            f"(`--max-error`; the goal is a 5% mean), any profile-only row's exceeds "
            f"{args.max_profile_error:.0%} (`--max-profile-error`, a guard against regressions "
            "of the model), or the planner ranks round-robin and the planned placement of "
            f"{RANKING_MODEL} on {RANKING_WORKERS} workers in the other order than measured"
            + (" (ranking skipped: `--skip-ranking`)." if args.skip_ranking else "."))


def ranking_check(work: Path, args, console: Console) -> tuple[bool, tuple[str, list, list]]:
    """Round-robin vs the planned placement: is the one predicted faster measured faster?
    (whether it agrees, and the table: title, headers, cells)"""
    measured = {}
    for solver in ("round-robin", "best"):
        _, placement = profile_and_plan(work, RANKING_MODEL, RANKING_WORKERS, args.batch_size,
                                        solver=solver)
        run = train(work, placement, RANKING_WORKERS, max(args.steps // 4, 20), "ranking")
        measured[solver] = validate(placement, run)["step_time"]
    title = f"Ranking: {RANKING_MODEL} on {RANKING_WORKERS} workers"
    headers = ["placement", "predicted", "measured"]
    cells = [[solver, _ms(row["predicted_s"]), _ms(row["measured_s"])]
             for solver, row in measured.items()]
    console.print(rich_table(title, headers, cells, left=("placement",)))
    rr, best = measured["round-robin"], measured["best"]
    predicted_order = rr["predicted_s"] > best["predicted_s"]
    measured_order = rr["measured_s"] > best["measured_s"]
    same = predicted_order == measured_order
    console.print("ranking agrees" if same else "ranking DISAGREES")
    return same, (title, headers, cells)


def _worst_phase(rows: dict) -> str:
    phases = [r for name, r in rows.items() if name != "step_time" and r["measured_s"] > 0]
    worst = max(phases, key=lambda r: abs(r["predicted_s"] - r["measured_s"]))
    return f"{worst['phase']} {_ms(worst['predicted_s'])} vs {_ms(worst['measured_s'])}"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
