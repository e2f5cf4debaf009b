"""`dpkfac plan`: solve the placement, write it atomically, print the report."""
from __future__ import annotations

import argparse

from rich.console import Console

from dpkfac.core.cluster import load_cluster
from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import write_json_atomic
from dpkfac.core.profile import load_profile
from dpkfac.core.units import parse_bytes, parse_float_list
from planner.cli.common import checked_output, make_console
from planner.model.costs import PlanConfig
from planner.placement import placement_document
from planner.plan import make_plan, resolve_cluster
from planner.report.compare import compare_rows
from planner.report.explain import explain_lines
from planner.report.tables import compare_table, print_plan_report
from planner.solve.names import DEFAULT_ILP_MAX_BINARIES, auto_time_limit_s


def run(args: argparse.Namespace) -> int:
    """`dpkfac plan`: solve, write the placement atomically, print the report."""
    out = checked_output(args.out)
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
                        inv_update_freq=args.inv_update_freq, overlap=args.overlap)
    profile = load_profile(args.profile)
    limit = args.time_limit if args.time_limit is not None else auto_time_limit_s(
        layers=len(profile.layers), workers=cluster.workers)
    plan = make_plan(profile=profile, cluster=cluster, config=config, method=args.solver,
                     memory_cap=cap, time_limit_s=limit, owners=args.owners,
                     split=args.split)
    placement = placement_document(plan, profile_path=args.profile, memory_cap=cap)
    console = make_console()
    rows = None
    if args.compare:
        rows = compare_rows(profile=profile, cluster=cluster, config=config, memory_cap=cap,
                            time_limit_s=limit, ilp_max_binaries=DEFAULT_ILP_MAX_BINARIES,
                            owners=args.owners, split=args.split)
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
