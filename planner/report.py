"""Human-readable reports of a placement and of a what-if sweep, as rich tables."""
from __future__ import annotations

from itertools import groupby
from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table


def format_bytes(nbytes: float) -> str:
    """Bytes in binary units, e.g. 1536 -> '1.5 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """Seconds with a unit that keeps 3-4 significant digits: s, ms or us."""
    if seconds == 0:
        return "0"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def plan_table(placement: dict) -> Table:
    """Per-worker table of a placement: rank, layers, compute, memory, share of the bottleneck."""
    pred = placement["predicted"]
    owned = _layers_per_rank(placement)
    bottleneck = max((w["compute_s"] for w in pred["per_worker"]), default=0.0)
    table = Table(title=f"Placement of {placement['model']} on {placement['world_size']} workers")
    table.add_column("rank", justify="right")
    table.add_column("layers", justify="right")
    table.add_column("compute", justify="right")
    table.add_column("memory", justify="right")
    table.add_column("of bottleneck", justify="right")
    for worker in pred["per_worker"]:
        share = worker["compute_s"] / bottleneck if bottleneck > 0 else 0.0
        style = "bold" if bottleneck > 0 and worker["compute_s"] == bottleneck else None
        table.add_row(str(worker["rank"]), str(owned.get(worker["rank"], 0)),
                      format_seconds(worker["compute_s"]), format_bytes(worker["memory_bytes"]),
                      f"{share:.0%}", style=style)
    return table


def summary_table(placement: dict) -> Table:
    """Predicted step, second-order part, lower bound, gap and the solver's verdict."""
    pred = placement["predicted"]
    bound, second = pred["lower_bound_s"], pred["second_order_s"]
    gap = (second - bound) / bound if bound > 0 else 0.0
    table = Table(show_header=False, title="Prediction (per step)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("step time", format_seconds(pred["step_time_s"]))
    table.add_row("second-order part", format_seconds(second))
    table.add_row("lower bound (second-order)", format_seconds(bound))
    table.add_row("gap to lower bound", f"{gap:.2%}")
    for key, label in (("compute_makespan_s", "  slowest owner compute"),
                       ("broadcast_s", "  broadcasts"), ("allreduce_s", "gradient all-reduce")):
        if key in pred:
            table.add_row(label, format_seconds(pred[key]))
    planner = placement.get("planner", {})
    solver = placement["solver"]
    if planner.get("requested_solver") not in (None, solver):
        solver = f"{solver} (via {planner['requested_solver']})"
    table.add_row("solver", solver)
    table.add_row("status", placement["status"])
    if "solve_time_s" in planner:
        table.add_row("solve time", format_seconds(planner["solve_time_s"]))
    return table


def print_plan_report(placement: dict, *, console: Console) -> None:
    """Print the per-worker table and the prediction summary of a placement to `console`."""
    console.print(plan_table(placement))
    console.print(summary_table(placement))


def whatif_table(rows: Sequence[dict]) -> Table:
    """What-if rows grouped by worker count; in each group the K-FAC variant with the least step
    time is marked with * (plain SGD, which has no second-order part, is there for reference)."""
    table = Table(title="What-if: predicted cost per step", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="traffic and memory per worker; * fastest K-FAC variant")
    for name in ("workers", "algorithm", "step time", "2nd order", "traffic", "memory"):
        table.add_column(name, justify="left" if name == "algorithm" else "right", no_wrap=True)
    groups = [list(g) for _, g in groupby(rows, key=lambda r: r["workers"])]
    for index, group in enumerate(groups):
        kfac = [r for r in group if r["algorithm"] != "sgd"] or group
        fastest = min(r["step_time_s"] for r in kfac)
        for row in group:
            best = any(row is r for r in kfac) and row["step_time_s"] <= fastest * (1 + 1e-9)
            table.add_row(str(row["workers"]), row["algorithm"] + (" *" if best else ""),
                          format_seconds(row["step_time_s"]),
                          format_seconds(row["second_order_s"]),
                          format_bytes(row["comm_bytes_per_step"]),
                          format_bytes(row["memory_bytes_per_worker"]),
                          style="bold green" if best else None,
                          end_section=index < len(groups) - 1 and row is group[-1])
    return table


def print_whatif_table(rows: Sequence[dict], *, console: Console) -> None:
    """Print the what-if table to `console`."""
    console.print(whatif_table(rows))


def _layers_per_rank(placement: dict) -> dict[int, int]:
    counts: dict[int, int] = {}
    for rank in placement["assignment"].values():
        counts[rank] = counts.get(rank, 0) + 1
    return counts
