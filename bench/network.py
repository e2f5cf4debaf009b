"""DP-KFAC on real links: an emulated cluster (dpkfac.emulation: one network namespace per node,
tbf-shaped veth links through a bridge, one torchrun agent per node) instead of loopback.

Per node count, in each of --rounds rounds, the model is profiled across the nodes at the base
rate (the profile's collectives are the shaped link's; the phases every rank runs at once are
timed on all ranks together) and every algorithm is trained at every rate; each run is predicted
from its round's profile alone, no calibration run: at the base rate as measured, at another
rate through the what-if's bandwidth scaling (`dpkfac whatif --bandwidth-scale`). Each row is
the median over the rounds of the predicted and of the measured step, so two bad rounds do not
move it: this shared host's speed drifts over seconds (the same dp-kfac run at 2 nodes and 100
Mbit/s, repeated, reads 43.4-46.6 ms; 48-61 ms before the links' token bucket outlasted tbf's
late timer, dpkfac.emulation.TBF_BURST_S), and each run lasts at least --min-run-seconds of
steps so that a fast algorithm's is not one second's. Also, per node count, the prediction
from a cluster file that describes the emulated cluster (its links' payload rate, no
measurement) beside the profile's.

dp-kfac rows run the overlapped step (train's default: owners build factors and decompose while
the gradient all-reduce is in flight), "dp-kfac serial" the serial one (--no-overlap), each
predicted by its own schedule.

Floors (exit 1 below them), for the first node count at the base rate: dp-kfac at least
--min-speedup (2x) faster per step than mpd-kfac and --min-overlap (1.15x) faster than serial
dp-kfac; every prediction within --max-error (10%) of the measured mean step.

    python bench/network.py [--nodes 2,3] [--rates 100mbit,400mbit] [--model digits-cnn]
                            [--steps 60] [--min-run-seconds 8] [--rounds 5]
                            [--work DIR]
                            [--docs-out docs/results/network.md | --no-docs]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from common import ResultsDoc, add_docs_arguments, docs_out, rich_table
from rich.console import Console

from dpkfac.core.placement import load_placement
from dpkfac.core.profile import load_profile
from dpkfac.core.units import payload_bytes_per_s
from dpkfac.emulation import (
    EmulatedCluster,
    emulation_unavailable,
    rate_bytes_per_s,
    tbf_burst_bytes,
)
from planner.model.calibrate import predicted_phases
from planner.whatif.sweep import scale_bandwidth

# (row name, dpkfac train flags, placement, variant the step model predicts); dp-kfac rows are
# overlapped (train's default) unless they say serial (--no-overlap)
ALGORITHMS = (
    ("sgd", ("--algorithm", "sgd"), "planned", "sgd"),
    ("dp-kfac", ("--algorithm", "dp-kfac"), "planned", "dp-kfac"),
    ("dp-kfac serial", ("--algorithm", "dp-kfac", "--no-overlap"), "planned", "dp-kfac"),
    ("dp-kfac round-robin", ("--algorithm", "dp-kfac"), "round-robin", "dp-kfac"),
    ("mpd-kfac", ("--algorithm", "mpd-kfac"), "planned", "mpd-kfac"),
    ("kaisa comm-opt", ("--algorithm", "kaisa", "--grad-worker-fraction", "1"), "planned",
     "kaisa-comm-opt"),
    ("kaisa mem-opt", ("--algorithm", "kaisa", "--grad-worker-fraction", "1/P"), "planned",
     "kaisa-mem-opt"),
)
ENV = {"OMP_NUM_THREADS": "1"}


def dpkfac_on(cluster: EmulatedCluster, *args: str, timeout_s: float = 900.0) -> None:
    """`dpkfac ARGS` with one process per emulated node; raise with the output on failure."""
    results = cluster.torchrun(["-m", "dpkfac.cli", *args], env=ENV, timeout_s=timeout_s)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"dpkfac {args[0]} failed on node {failed[0].node}:\n"
                           f"{failed[0].stderr[-3000:]}")


def plan(profile: Path, out: Path, *flags: str) -> Path:
    """`dpkfac plan --profile PROFILE --out OUT FLAGS` in process; the placement's path."""
    from dpkfac.cli import main

    if main(["plan", "--profile", str(profile), "--out", str(out), *flags]) != 0:
        raise RuntimeError(f"dpkfac plan {' '.join(flags)} failed")
    return out


def cluster_file(work: Path, nodes: int, rate: str) -> Path:
    """A dpkfac cluster file of the emulated cluster: one worker per node, the payload rate
    TCP gets on its links."""
    path = work / f"cluster-{nodes}.json"
    path.write_text(json.dumps({
        "schema": "dpkfac.cluster/1", "nodes": nodes, "gpus_per_node": 1,
        "inter_node": {"bandwidth_bytes_per_s": payload_bytes_per_s(rate), "latency_s": 1e-4},
        "intra_node": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5}}))
    return path


def measure_nodes(work: Path, nodes: int, rates: list[str], args) -> list[dict]:
    """Every (round, rate, algorithm) row of one node count: predicted and measured mean step.

    Each round profiles across the nodes at the base rate and then trains every algorithm at
    every rate (an algorithm's rates back to back), each run predicted from that round's
    profile: the host's speed drifts by 10-20% over minutes on a shared machine, so a
    prediction is compared with runs made beside its profile, and rounds' medians damp the drift.
    The placements come from the first round's profile and stay fixed."""
    rows = []
    with EmulatedCluster(nodes=nodes, rate=rates[0]) as cluster:
        placements = {}
        for round_ in range(args.rounds):
            if cluster.rate != rates[0]:
                cluster.set_rate(rates[0])
            profile_path = work / f"profile-{nodes}-{round_}.json"
            dpkfac_on(cluster, "profile", "--model", args.model, "--batch-size",
                      str(args.batch_size), "--out", str(profile_path), "--link-rate", rates[0],
                      "--link-burst", str(tbf_burst_bytes(rates[0])))
            profile = load_profile(profile_path)
            if not placements:
                placements = plan_placements(work, profile_path, nodes)
            # odd rounds run in reverse, so a drift of the host's speed evens out
            order = selected(args)[::-1] if round_ % 2 else selected(args)
            for name, flags, which, variant in order:
                for rate in rates[::-1] if round_ % 2 else rates:
                    if rate != cluster.rate:
                        cluster.set_rate(rate)
                    scaled = scale_bandwidth(profile,
                                             rate_bytes_per_s(rate) / rate_bytes_per_s(rates[0]))
                    predicted = predicted_phases(scaled, load_placement(placements[which]),
                                                 variant=variant,
                                                 overlap="--no-overlap" not in flags
                                                 )["step_time"][0]
                    steps = run_steps(args.steps, args.min_run_seconds, predicted)
                    run = work / f"run-{nodes}-{round_}-{rate}-{name.replace(' ', '-')}"
                    dpkfac_on(cluster, "train", "--placement", str(placements[which]), "--out",
                              str(run), "--max-steps", str(steps), "--epochs", "1000",
                              "--no-progress", *(f.replace("P", str(nodes)) for f in flags))
                    summary = json.loads((run / "summary.json").read_text())
                    rows.append({"nodes": nodes, "round": round_, "rate": rate,
                                 "algorithm": name, "predicted_s": predicted,
                                 "measured_s": summary["mean_step_time_s"], "steps": steps,
                                 "bytes": summary["comm_bytes_per_step"]["total"]})
    return rows


def run_steps(least: int, least_seconds: float, predicted_s: float) -> int:
    """Steps of one measured run: at least `least`, and enough for about `least_seconds` of
    steps at the predicted step time (seconds): this host's speed wanders over seconds, so a
    run of a fast algorithm is made long enough to average over it, not over one second."""
    return max(least, math.ceil(least_seconds / predicted_s)) if predicted_s > 0 else least


def plan_placements(work: Path, profile: Path, nodes: int) -> dict[str, Path]:
    """The planned and the round-robin placement of `profile` on `nodes` workers."""
    workers = ("--workers", str(nodes))
    return {"planned": plan(profile, work / f"planned-{nodes}.json", *workers),
            "round-robin": plan(profile, work / f"rr-{nodes}.json", *workers,
                                "--solver", "round-robin")}


def selected(args) -> list[tuple]:
    """The ALGORITHMS rows named in --algorithms."""
    return [row for row in ALGORITHMS if row[0] in args.algorithms.split(",")]


def over_rounds(rows: list[dict]) -> list[dict]:
    """One row per (nodes, rate, algorithm): predicted and measured median over the rounds,
    and the smallest and largest single-round error."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["nodes"], r["rate"], r["algorithm"]), []).append(r)
    out = []
    for (nodes, rate, algorithm), group in groups.items():
        errors = [g["predicted_s"] / g["measured_s"] - 1 for g in group]
        out.append({"nodes": nodes, "rate": rate, "algorithm": algorithm,
                    "predicted_s": statistics.median(g["predicted_s"] for g in group),
                    "measured_s": statistics.median(g["measured_s"] for g in group),
                    "round_errors": (min(errors), max(errors)),
                    "steps": statistics.median(g["steps"] for g in group),
                    "bytes": group[-1]["bytes"]})
    return out


def cluster_rows(work: Path, nodes: int, rate: str) -> dict:
    """dp-kfac's predicted step from the profile measured on the emulated cluster and from a
    cluster file of it (same model, same owners count)."""
    out = plan(work / f"profile-{nodes}-0.json", work / f"from-cluster-{nodes}.json",
               "--cluster", str(cluster_file(work, nodes, rate)))
    measured = load_placement(work / f"planned-{nodes}.json")["predicted"]["step_time_s"]
    described = load_placement(out)["predicted"]["step_time_s"]
    return {"nodes": nodes, "profile_s": measured, "cluster_file_s": described}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="2,3")
    parser.add_argument("--rates", default="100mbit,400mbit",
                        help="link rates; the first is the profile's")
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60,
                        help="least steps per run (the first 5 are not timed)")
    parser.add_argument("--min-run-seconds", type=float, default=8.0,
                        help="and at least this many seconds of steps per run, at the "
                        "predicted step time")
    parser.add_argument("--rounds", type=lambda s: max(int(s), 1), default=5,
                        help="profile + every run, repeated; a row is the median of the "
                        "rounds' predictions and of their measurements")
    parser.add_argument("--algorithms", default=",".join(a[0] for a in ALGORITHMS),
                        help="rows to run (comma-separated names of the table's algorithms)")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="keep profiles, placements and runs here (default: a temporary "
                        "folder, removed)")
    parser.add_argument("--max-error", type=float, default=0.10)
    parser.add_argument("--min-speedup", type=float, default=2.0,
                        help="floor: dp-kfac vs mpd-kfac (first node count, base rate)")
    parser.add_argument("--min-overlap", type=float, default=1.15,
                        help="floor: overlapped vs serial dp-kfac (first node count, base rate)")
    add_docs_arguments(parser, "network")
    args = parser.parse_args()
    reason = emulation_unavailable()
    if reason:
        print(f"error: no emulated cluster here: {reason}", file=sys.stderr)
        return 2
    nodes = [int(n) for n in args.nodes.split(",")]
    rates = args.rates.split(",")
    with tempfile.TemporaryDirectory(prefix="dpkfac-network-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = over_rounds([row for n in nodes for row in measure_nodes(work, n, rates, args)])
        described = [cluster_rows(work, n, rates[0]) for n in nodes]
    return report(rows, described, args, nodes, rates)


def report(rows: list[dict], described: list[dict], args, nodes: list[int],
           rates: list[str]) -> int:
    failures = []
    headers = ["nodes", "link", "algorithm", "predicted ms", "measured ms", "error",
               "rounds' errors", "steps/run", "traffic KB/step"]
    cells = []
    for r in rows:
        error = r["predicted_s"] / r["measured_s"] - 1
        if abs(error) > args.max_error:
            failures.append(f"{r['algorithm']} on {r['nodes']} nodes at {r['rate']}: "
                            f"prediction off by {100 * error:+.1f}%")
        cells.append([str(r["nodes"]), r["rate"], r["algorithm"],
                      f"{1e3 * r['predicted_s']:.1f}", f"{1e3 * r['measured_s']:.1f}",
                      f"{100 * error:+.1f}%",
                      " .. ".join(f"{100 * e:+.1f}%" for e in r["round_errors"]),
                      f"{r['steps']:.0f}", f"{r['bytes'] / 1e3:,.0f}"])
    step = {(r["nodes"], r["rate"], r["algorithm"]): r["measured_s"] for r in rows}
    speedups = []
    for slower, floor in (("mpd-kfac", args.min_speedup), ("dp-kfac serial", args.min_overlap)):
        ratio = step.get((nodes[0], rates[0], slower), float("nan")) / \
            step.get((nodes[0], rates[0], "dp-kfac"), float("nan"))
        speedups.append(f"dp-kfac (overlapped) vs {slower} on {nodes[0]} nodes at {rates[0]}: "
                        f"{ratio:.2f}x (floor {floor}x)")
        if not ratio >= floor:
            failures.append(f"dp-kfac only {ratio:.2f}x faster than {slower} on {nodes[0]} nodes "
                            f"at {rates[0]} (floor {floor}x)")
    file_cells = []
    for d in described:
        error = d["cluster_file_s"] / d["profile_s"] - 1
        if abs(error) > args.max_error:
            failures.append(f"cluster file on {d['nodes']} nodes: {100 * error:+.1f}% from the "
                            "profile's prediction")
        file_cells.append([str(d["nodes"]), f"{1e3 * d['profile_s']:.1f}",
                           f"{1e3 * d['cluster_file_s']:.1f}", f"{100 * error:+.1f}%"])
    console = Console(width=120)
    title = (f"{args.model} (batch {args.batch_size}/worker), at least {args.steps} steps and "
             f"{args.min_run_seconds:g} s per run, "
             f"median of {args.rounds} rounds: predicted (each round's profile at the first rate, "
             "no calibration) vs measured mean step")
    console.print(rich_table(title, headers, cells, left=("link", "algorithm")))
    file_headers = ["nodes", "from the profile ms", "from a cluster file ms", "difference"]
    console.print(rich_table("dp-kfac: predicted step from the measured profile vs from a "
                             "cluster file of the emulated cluster", file_headers, file_cells))
    for line in speedups:
        console.print(line)
    for failure in failures:
        console.print(f"[red]FAIL[/red] {failure}")
    path = docs_out(args)
    if path is not None:
        doc = ResultsDoc("network", "DP-KFAC on emulated links", floors=(
            f"dp-kfac (overlapped) at least {args.min_speedup}x faster per step than mpd-kfac "
            f"and at least {args.min_overlap}x faster than serial dp-kfac on {nodes[0]} nodes "
            f"at {rates[0]}; every prediction within {100 * args.max_error:.0f}% of the "
            "measured mean step."))
        doc.table(headers, cells, title=title, left=("link", "algorithm"))
        doc.table(file_headers, file_cells, title="dp-kfac from a cluster file")
        for line in speedups:
            doc.text(line + ".")
        doc.write(path, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
