"""`dpkfac whatif`: predict every algorithm at every sweep point; a table, csv or json."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from dpkfac.core.cluster import load_cluster
from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import write_atomic, write_json_atomic
from dpkfac.core.placement import load_placement, owners_by_layer
from dpkfac.core.profile import Profile, load_profile
from dpkfac.core.units import parse_float_list, parse_int_list
from planner.cli.common import checked_output, make_console
from planner.model.step import placement_split
from planner.report.tables import print_whatif_table, setting_title, write_whatif_plot
from planner.whatif.sweep import (
    ROW_KEYS,
    WHATIF_SCHEMA_ID,
    Sweep,
    Topology,
    expand_workers,
    knees,
    setting_groups,
    sweep_rows,
)


def run(args: argparse.Namespace) -> int:
    """`dpkfac whatif`: predict every algorithm at every sweep point; table, csv or json."""
    out = checked_output(args.out) if args.out is not None else None
    plot = checked_output(args.plot) if args.plot is not None else None
    if out is not None and args.format == "table":
        raise InputError("--out needs --format csv or json (the table goes to the terminal)")
    profile = load_profile(args.profile)
    sweep = _whatif_sweep(args, profile)
    rows = sweep_rows(profile, sweep)
    document = {"schema": WHATIF_SCHEMA_ID, "profile": args.profile,
                "config": {"factor_update_freq": sweep.factor_update_freqs[0],
                           "inv_update_freq": sweep.inv_update_freqs[0],
                           "overlap": sweep.overlap},
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
        console = make_console()
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


def _whatif_sweep(args: argparse.Namespace, profile: Profile) -> Sweep:
    """The sweep the whatif flags describe (InputError for malformed lists or files)."""
    topology = None
    if args.cluster is not None:
        cluster = load_cluster(args.cluster)
        topology = Topology(gpus_per_node=cluster.gpus_per_node, intra_node=cluster.intra_node,
                            inter_node=cluster.inter_node)
    batches = (parse_int_list(args.batch_sizes, what="--batch-sizes")
               if args.batch_sizes is not None else None)
    owners, placed_workers, split = None, None, None
    if args.placement is not None:
        placement = load_placement(args.placement)
        source = f"placement {args.placement!r}"
        owners = owners_by_layer(placement, [layer.name for layer in profile.layers],
                                 source=source)
        placed_workers = placement["world_size"]
        split = placement_split(profile, placement, source=source)
    return Sweep(workers=expand_workers(args.workers), batch_sizes=batches,
                 placement_owners=owners, placement_workers=placed_workers,
                 placement_split=split,
                 bandwidth_scales=parse_float_list(args.bandwidth_scale, what="--bandwidth-scale"),
                 factor_update_freqs=parse_int_list(args.factor_update_freq,
                                                    what="--factor-update-freq"),
                 inv_update_freqs=parse_int_list(args.inv_update_freq, what="--inv-update-freq"),
                 topology=topology, overlap=args.overlap)


def _write_csv(fh, rows: list[dict]) -> None:
    extra = [k for k in (rows[0] if rows else {}) if k not in ROW_KEYS]
    writer = csv.DictWriter(fh, fieldnames=list(ROW_KEYS) + extra, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
