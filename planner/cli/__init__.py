"""The `plan`, `whatif` and `validate` subcommands of the dpkfac command line.

Their parsers are here and import nothing heavy; each command's module (planner.cli.plan,
.whatif, .validate) is imported only when that command runs. No torch anywhere in the planner.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Callable

from dpkfac.core.units import fraction, positive_float, positive_int
from planner.solve.names import METHODS, OWNER_MODES


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
    plan.add_argument("--no-split", dest="split", action="store_false",
                      help="never split a layer's preconditioning across workers (by default "
                      "the heaviest layers' preconditioning is shared by all workers when that "
                      "predicts a shorter step: the placement's precondition_split)")
    plan.add_argument("--explain", action="store_true",
                      help="also explain why the bottleneck worker is the bottleneck")
    plan.add_argument("--compare", action="store_true",
                      help="also run every solver on the same profile and print them side by side")
    plan.set_defaults(func=_command("plan"))

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
    _add_overlap_flag(whatif)
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
    whatif.add_argument("--placement", metavar="FILE",
                        help="a placement for this profile: at its world size the dp-kfac row "
                             "takes its owners (the row then equals the placement's prediction)")
    whatif.add_argument("--out", metavar="FILE",
                        help="write csv/json here instead of standard output")
    whatif.set_defaults(func=_command("whatif"))

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
    validate.set_defaults(func=_command("validate"))


def _add_overlap_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="predict the serial step (`dpkfac train --no-overlap`) instead of "
                             "the overlapped one, where owners build factors and decompose "
                             "while the gradient all-reduce is in flight")


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The `run` function of planner.cli.<name>, imported when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"planner.cli.{name}").run(args)
    return run


def _add_freq_flags(parser: argparse.ArgumentParser) -> None:
    _add_overlap_flag(parser)
    parser.add_argument("--factor-update-freq", type=positive_int, default=1, metavar="STEPS",
                        help="rebuild K-FAC factors every STEPS steps (default 1)")
    parser.add_argument("--inv-update-freq", type=positive_int, default=1, metavar="STEPS",
                        help="recompute decompositions every STEPS steps (default 1)")
