"""The `plan` and `whatif` subcommands of the dpkfac command line (no torch here)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from rich.console import Console

from dpkfac.core.cluster import load_cluster
from planner.report.compare import compare_rows
from planner.model.costs import PlanConfig
from dpkfac.core.errors import InputError
from planner.report.explain import explain_lines
from dpkfac.core.jsonio import write_atomic, write_json_atomic
from dpkfac.core.placement import load_placement
from planner.placement import placement_document
from planner.solve.owners import OWNER_MODES
from planner.plan import make_plan, resolve_cluster
from dpkfac.core.profile import load_profile, profile_to_dict
from dpkfac.core.strategy import VARIANTS
from planner.report.tables import (compare_table, print_plan_report, print_whatif_table, setting_title,
                     validation_table, write_whatif_plot)
from planner.solve.solvers import DEFAULT_ILP_MAX_BINARIES, METHODS, auto_time_limit_s
from dpkfac.core.units import (fraction, parse_bytes, parse_float_list, parse_int_list, positive_float,
                    positive_int)
from planner.model.calibrate import calibrate, compare, load_run_summary, measured_phases, predicted_phases
from planner.whatif.sweep import (ROW_KEYS, WHATIF_SCHEMA_ID, Sweep, Topology, expand_workers,
                     knees, setting_groups, sweep_rows)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan`, `whatif` and `validate` subparsers; each sets func=<function(args) -> exit
    status>."""
    plan = subparsers.add_parser(
        "plan", help="assign K-FAC layers to workers and write a placement",
        description="Solve which worker owns each K-FAC layer from a profile, write the "
                    "placement file (dpkfac.placement/1) and print a short report.")
    plan.add_argument("--profile", required=True, metavar="FILE", help="profile JSON file")
    plan.add_argument("--workers", type=positive_int, metavar="N",
                      help="number of workers (ranks) of a flat cluster; required unless "
                           "--cluster is given")
    plan.add_argument("--cluster", metavar="FILE",
                      help="cluster description (JSON, schema dpkfac.cluster/1): nodes x GPUs "
                           "per node, link bandwidth and latency, per-worker speed and memory")
    plan.add_argument("--out", required=True, metavar="FILE", help="placement file to write")
    plan.add_argument("--solver", choices=METHODS, default="best",
                      help="placement method (default: best, the least makespan of all)")
    _add_freq_flags(plan)
    plan.add_argument("--memory-cap", metavar="BYTES",
                      help="second-order state allowed per worker, e.g. 512MiB, 2GB, 1073741824")
    plan.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                      help="time limit of local search and ILP together (default: 0.5 s + "
                           "0.1 ms per layer x worker, at most 3 s); --owners auto adds its "
                           "search, up to min(limit, 1 s) more")
    plan.add_argument("--speeds", metavar="LIST",
                      help="relative worker speeds, one per rank, e.g. 1,1,1,0.5 (default all 1)")
    plan.add_argument("--owners", choices=OWNER_MODES, default="auto",
                      help="auto (default): with --solver best, also place the layers on fewer "
                      "owners (halving the count) and keep the shortest predicted step, since "
                      "every owner pays a broadcast; all: the solver's placement as is")
    plan.add_argument("--explain", action="store_true",
                      help="also explain why the bottleneck worker is the bottleneck")
    plan.add_argument("--compare", action="store_true",
                      help="also run every solver on the same profile and print them side by side")
    plan.set_defaults(func=run_plan)

    whatif = subparsers.add_parser(
        "whatif", help="predict step time, traffic and memory per worker count and algorithm",
        description="Predict, from one profile, the per-step time, second-order time, traffic "
                    "and per-worker memory of SGD, MPD-KFAC, KAISA (COMM-OPT, MEM-OPT), DP-KFAC "
                    "with round-robin owners and DP-KFAC with the planner's placement, for every "
                    "point of a sweep, with the same cost model and simulator as `plan`; names "
                    "the scaling knee (where adding workers stops paying).")
    whatif.add_argument("--profile", required=True, metavar="FILE", help="profile JSON file")
    whatif.add_argument("--workers", required=True, metavar="LIST",
                        help="worker counts: 1,2,4,8 or powers-of-two ranges like 1..4096")
    whatif.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="output format (default table)")
    whatif.add_argument("--factor-update-freq", default="1", metavar="LIST",
                        help="rebuild K-FAC factors every STEPS steps; a list sweeps (default 1)")
    whatif.add_argument("--inv-update-freq", default="1", metavar="LIST",
                        help="recompute decompositions every STEPS steps; a list sweeps "
                             "(default 1)")
    whatif.add_argument("--batch-sizes", metavar="LIST",
                        help="per-worker batch sizes to sweep (default: the profile's); "
                             "forward/backward and factor construction scale linearly")
    whatif.add_argument("--bandwidth-scale", default="1", metavar="LIST",
                        help="multiply every collective's bandwidth, e.g. 0.5,1,4 (default 1)")
    whatif.add_argument("--cluster", metavar="FILE",
                        help="cluster file (dpkfac.cluster/1): take its GPUs per node and its "
                             "intra/inter-node links; each worker count fills nodes in order")
    whatif.add_argument("--knee-efficiency", type=fraction, default=0.5, metavar="F",
                        help="adding workers pays while it brings at least this share of the "
                             "ideal throughput gain (default 0.5)")
    whatif.add_argument("--plot", metavar="FILE.png",
                        help="also draw step time, memory and traffic against workers (log "
                             "axes, one line per algorithm; the first setting of the sweep)")
    whatif.add_argument("--out", metavar="FILE",
                        help="write csv/json here instead of standard output")
    whatif.set_defaults(func=run_whatif)

    validate = subparsers.add_parser(
        "validate", help="compare a placement's predicted phases with a training run's",
        description="Print predicted vs measured seconds per phase and for the whole step (mean "
                    "over ranks) with the relative error; optionally write a profile calibrated "
                    "from the run, so the next plan predicts better.")
    validate.add_argument("--placement", required=True, metavar="FILE", help="placement file")
    validate.add_argument("--run", required=True, metavar="DIR",
                          help="folder of a `dpkfac train` run (its summary.json)")
    validate.add_argument("--profile", metavar="FILE",
                          help="profile to predict from (default: the one the placement names)")
    validate.add_argument("--calibrate-out", metavar="FILE",
                          help="write a calibrated copy of the profile here")
    validate.add_argument("--format", choices=("table", "json"), default="table")
    validate.set_defaults(func=run_validate)


def run_plan(args: argparse.Namespace) -> int:
    """`dpkfac plan`: solve, write the placement atomically, print the report."""
    out = _checked_output(args.out)
    cap = parse_bytes(args.memory_cap, what="--memory-cap") if args.memory_cap is not None else None
    cluster_file = load_cluster(args.cluster) if args.cluster is not None else None
    workers = args.workers if args.workers is not None else (
        cluster_file.workers if cluster_file is not None else None)
    speeds = None
    if args.speeds is not None:
        speeds = parse_float_list(args.speeds, what="--speeds")
        if workers is not None and len(speeds) != workers:
            raise InputError(f"--speeds gives {len(speeds)} speeds for {workers} workers")
    cluster = resolve_cluster(workers=args.workers, speeds=speeds, cluster=cluster_file)
    config = PlanConfig(factor_update_freq=args.factor_update_freq,
                        inv_update_freq=args.inv_update_freq)
    profile = load_profile(args.profile)
    limit = args.time_limit if args.time_limit is not None else auto_time_limit_s(
        layers=len(profile.layers), workers=cluster.workers)
    plan = make_plan(profile=profile, cluster=cluster, config=config, method=args.solver,
                     memory_cap=cap, time_limit_s=limit, owners=args.owners)
    placement = placement_document(plan, profile_path=args.profile, memory_cap=cap)
    console = _console()
    rows = None
    if args.compare:
        rows = compare_rows(profile=profile, cluster=cluster, config=config, memory_cap=cap,
                            time_limit_s=limit, ilp_max_binaries=DEFAULT_ILP_MAX_BINARIES,
                            owners=args.owners)
    write_json_atomic(out, placement)
    print_plan_report(placement, console=console)
    if args.explain:
        console.print("[bold]Why the bottleneck is the bottleneck[/bold]")
        for line in explain_lines(plan):
            console.print(line, highlight=False)
    if rows is not None:
        Console(width=max(console.width, 132), file=console.file).print(compare_table(rows))
    console.print(f"wrote {out}")
    return 0


def run_whatif(args: argparse.Namespace) -> int:
    """`dpkfac whatif`: predict every algorithm at every sweep point; table, csv or json."""
    out = _checked_output(args.out) if args.out is not None else None
    plot = _checked_output(args.plot) if args.plot is not None else None
    if out is not None and args.format == "table":
        raise InputError("--out needs --format csv or json (the table goes to the terminal)")
    sweep = _whatif_sweep(args)
    profile = load_profile(args.profile)
    rows = sweep_rows(profile, sweep)
    document = {"schema": WHATIF_SCHEMA_ID, "profile": args.profile,
                "config": {"factor_update_freq": sweep.factor_update_freqs[0],
                           "inv_update_freq": sweep.inv_update_freqs[0]},
                "knees": [{**settings, "efficiency": args.knee_efficiency,
                           "workers_by_algorithm": knees(members,
                                                         efficiency=args.knee_efficiency)}
                          for settings, members in setting_groups(rows)],
                "rows": rows}
    if plot is not None:
        settings, members = setting_groups(rows)[0]
        write_whatif_plot(members, plot, knees=knees(members, efficiency=args.knee_efficiency),
                          title=f"{profile.model}: {setting_title(settings)}")
    if args.format == "table":
        console = _console()
        print_whatif_table(rows, console=console, efficiency=args.knee_efficiency)
        if plot is not None:
            console.print(f"wrote {plot}")
        return 0
    if args.format == "json":
        if out is not None:
            write_json_atomic(out, document)
        else:
            sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    if out is not None:
        write_atomic(out, lambda fh: _write_csv(fh, rows))
    else:
        buffer = io.StringIO()
        _write_csv(buffer, rows)
        sys.stdout.write(buffer.getvalue())
    return 0


def _whatif_sweep(args: argparse.Namespace) -> Sweep:
    """The sweep the whatif flags describe (InputError for malformed lists or files)."""
    topology = None
    if args.cluster is not None:
        cluster = load_cluster(args.cluster)
        topology = Topology(gpus_per_node=cluster.gpus_per_node, intra_node=cluster.intra_node,
                            inter_node=cluster.inter_node)
    batches = (parse_int_list(args.batch_sizes, what="--batch-sizes")
               if args.batch_sizes is not None else None)
    return Sweep(workers=expand_workers(args.workers), batch_sizes=batches,
                 bandwidth_scales=parse_float_list(args.bandwidth_scale, what="--bandwidth-scale"),
                 factor_update_freqs=parse_int_list(args.factor_update_freq,
                                                    what="--factor-update-freq"),
                 inv_update_freqs=parse_int_list(args.inv_update_freq, what="--inv-update-freq"),
                 topology=topology)


def run_validate(args: argparse.Namespace) -> int:
    """`dpkfac validate`: predicted vs measured per phase; optional calibrated profile."""
    out = _checked_output(args.calibrate_out) if args.calibrate_out is not None else None
    placement = load_placement(args.placement)
    profile_path = args.profile or placement["profile"]["path"]
    profile = load_profile(profile_path)
    summary = load_run_summary(args.run)
    if summary["world_size"] != placement["world_size"]:
        raise InputError(f"run {args.run!r} has world_size {summary['world_size']}, placement "
                         f"{args.placement!r} is for {placement['world_size']}")
    staggered = bool(summary.get("staggered_decompositions", False))
    variant = summary.get("variant", "dp-kfac")
    if variant not in VARIANTS:
        raise InputError(f"run summary in {args.run!r}: field variant: expected one of "
                         f"{', '.join(VARIANTS)}, got {variant!r}")
    measured = measured_phases(summary)
    rows = compare(predicted_phases(profile, placement, variant=variant, staggered=staggered),
                   measured)
    scales = None
    if out is not None:
        calibrated, scales = calibrate(profile, placement, measured, variant=variant,
                                       staggered=staggered)
        write_json_atomic(out, profile_to_dict(calibrated))
    if args.format == "json":
        document = {"schema": "dpkfac.validation/1", "placement": args.placement,
                    "run": args.run, "profile": profile_path,
                    "rows": [{"phase": r.phase, "predicted_s": r.predicted_s,
                              "measured_s": r.measured_s, "rel_error": r.rel_error}
                             for r in rows], "calibration_scales": scales}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    console = _console()
    console.print(validation_table(rows, title=f"{placement['model']} on "
                                               f"{placement['world_size']} worker(s): predicted "
                                               "vs measured, mean over ranks"))
    if out is not None:
        console.print(f"wrote calibrated profile {out}")
    return 0


def _write_csv(fh, rows: list[dict]) -> None:
    extra = [k for k in (rows[0] if rows else {}) if k not in ROW_KEYS]
    writer = csv.DictWriter(fh, fieldnames=list(ROW_KEYS) + extra, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def _add_freq_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--factor-update-freq", type=positive_int, default=1, metavar="STEPS",
                        help="rebuild K-FAC factors every STEPS steps (default 1)")
    parser.add_argument("--inv-update-freq", type=positive_int, default=1, metavar="STEPS",
                        help="recompute decompositions every STEPS steps (default 1)")


def _checked_output(path: str) -> Path:
    """The output path, after checking its folder exists and it is not a folder itself."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    if out.is_dir():
        raise InputError(f"output {str(out)!r} is a folder; expected a file name")
    return out








def _console() -> Console:
    """A rich console at least 100 columns wide, so piped tables are not cut at 80."""
    detected = Console()
    return Console(width=max(detected.width, 100)) if not detected.is_terminal else detected
