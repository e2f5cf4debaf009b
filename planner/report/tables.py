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


def plan_table(placement: dict, *, max_rows: int = 32) -> Table:
    """Per-worker table of a placement: rank, layers, compute, busy, idle, memory (state and
    with the buffers every worker holds), share of the bottleneck. With more than `max_rows`
    workers only the busiest `max_rows` are shown, in rank order."""
    pred = placement["predicted"]
    workers = pred["per_worker"]
    bottleneck = max((w["compute_s"] for w in workers), default=0.0)
    shown = workers
    if len(workers) > max_rows:
        keep = {w["rank"] for w in sorted(workers, key=lambda w: -w["compute_s"])[:max_rows]}
        shown = [w for w in workers if w["rank"] in keep]
    caption = (f"the {len(shown)} busiest of {len(workers)} workers" if len(shown) < len(workers)
               else None)
    table = Table(title=f"Placement of {placement['model']} on {placement['world_size']} workers",
                  caption=caption)
    for name in ("rank", "layers", "compute", "busy", "idle", "state", "memory", "cap",
                 "of bottleneck"):
        table.add_column(name, justify="right")
    owned = _layers_per_rank(placement)
    for worker in shown:
        share = worker["compute_s"] / bottleneck if bottleneck > 0 else 0.0
        style = "bold" if bottleneck > 0 and worker["compute_s"] == bottleneck else None
        cap = worker.get("memory_cap_bytes")
        table.add_row(str(worker["rank"]), str(owned.get(worker["rank"], 0)),
                      format_seconds(worker["compute_s"]),
                      format_seconds(worker["busy_s"]) if "busy_s" in worker else "",
                      format_seconds(worker["idle_s"]) if "idle_s" in worker else "",
                      format_bytes(worker["memory_bytes"]),
                      format_bytes(worker.get("total_memory_bytes", worker["memory_bytes"])),
                      format_bytes(cap) if cap is not None else "-",
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
    cycle = pred.get("cycle", {}).get("steps", 1)
    table.add_row("step time (simulated)" + (f", mean of {cycle}" if cycle > 1 else ""),
                  format_seconds(pred["step_time_s"]))
    table.add_row("second-order part", format_seconds(second))
    table.add_row("lower bound (second-order)", format_seconds(bound))
    table.add_row("gap to lower bound", f"{gap:.2%}")
    for key, label in (("compute_makespan_s", "  slowest owner compute (amortised)"),
                       ("broadcast_s", "  broadcasts"), ("allreduce_s", "gradient all-reduce")):
        if key in pred:
            table.add_row(label, format_seconds(pred[key]))
    if "staggered" in pred:
        st = pred["staggered"]
        table.add_row("step time, staggered decompositions*", format_seconds(st["step_time_s"]))
        table.add_row("  busiest step compute: executor / staggered",
                      f"{format_seconds(max(st['executor_per_step_makespan_s']))} / "
                      f"{format_seconds(max(st['per_step_makespan_s']))}")
    planner = placement.get("planner", {})
    solver = placement["solver"]
    if planner.get("requested_solver") not in (None, solver):
        solver = f"{solver} (via {planner['requested_solver']})"
    table.add_row("solver", solver)
    table.add_row("status", placement["status"])
    trials = planner.get("owner_search") or []
    if trials:
        tried = ", ".join(f"{t['owners']}: " + ("no plan within the caps" if t["step_time_s"] is None
                                                else format_seconds(t["step_time_s"]))
                          for t in trials)
        table.add_row("owners (step by owner count)", f"{planner['owners']} ({tried})")
    if "ilp" in planner:
        table.add_row("ILP", planner["ilp"])
    if "solve_time_s" in planner:
        table.add_row("solve time", format_seconds(planner["solve_time_s"]))
    if "staggered" in pred:
        table.caption = ("* schedule in 'decomposition_step', followed by `dpkfac train "
                         "--stagger-decompositions` (by default every layer decomposes on step 0 "
                         "of each cycle): a lower peak step, not a lower mean")
    return table


def critical_path_line(placement: dict) -> str | None:
    """The critical path of the slowest simulated step, as one line."""
    path = placement["predicted"].get("critical_path")
    if not path:
        return None
    parts = []
    for seg in path:
        who = f"[{seg['worker']}]" if seg["worker"] is not None else ""
        count = f" x{seg['layers']}" if seg.get("layers") else ""
        count += f" x{seg['count']}" if seg.get("count", 1) > 1 else ""
        parts.append(f"{seg['kind']}{who}{count} {format_seconds(seg['end_s'] - seg['start_s'])}")
    return "critical path: " + " -> ".join(parts)


def split_line(placement: dict, *, max_layers: int = 8) -> str | None:
    """The layers whose preconditioning every worker shares (precondition_split) and their rows
    per rank, as one line (None when none is split)."""
    split = placement.get("precondition_split") or {}
    if not split:
        return None
    parts = [f"{name} (rows {'/'.join(str(r) for r in rows)})"
             for name, rows in list(split.items())[:max_layers]]
    more = f" and {len(split) - max_layers} more" if len(split) > max_layers else ""
    return ("split preconditioning (every rank takes its rows, one all-reduce adds them): "
            + ", ".join(parts) + more)


def print_plan_report(placement: dict, *, console: Console) -> None:
    """Print the per-worker table and the prediction summary of a placement to `console`."""
    console.print(plan_table(placement))
    console.print(summary_table(placement))
    split = split_line(placement)
    if split:
        console.print(split, highlight=False)
    line = critical_path_line(placement)
    if line:
        console.print(line)


def compare_table(rows: Sequence[dict]) -> Table:
    """Every solver side by side. Row keys: solver, makespan_s, second_order_s, step_time_s,
    lower_bound_s, status, solve_time_s, max_memory_bytes, winner (the method that won inside
    it), error (why it found no plan)."""
    table = Table(title="Solvers compared on the same profile", box=box.SIMPLE_HEAD,
                  caption="makespan: busiest worker's amortised K-FAC compute; "
                          "/LB: makespan over the best proven lower bound")
    for name in ("solver", "plan from", "makespan", "/LB", "2nd order", "step", "max state",
                 "status", "time"):
        table.add_column(name, justify="left" if name in ("solver", "plan from", "status")
                         else "right", no_wrap=True)
    best = min((r["makespan_s"] for r in rows if r.get("error") is None), default=None)
    bound = max((r["lower_bound_s"] for r in rows if r.get("error") is None), default=0.0)
    for r in rows:
        if r.get("error") is not None:
            table.add_row(r["solver"], "-", "no plan", "", "", "", "", r["error"][:40], "")
            continue
        ratio = r["makespan_s"] / bound if bound > 0 else 1.0
        style = "bold green" if best is not None and r["makespan_s"] <= best * (1 + 1e-9) else None
        table.add_row(r["solver"], r["winner"], format_seconds(r["makespan_s"]), f"{ratio:.4f}",
                      format_seconds(r["second_order_s"]), format_seconds(r["step_time_s"]),
                      format_bytes(r["max_memory_bytes"]), r["status"],
                      format_seconds(r["solve_time_s"]), style=style)
    return table


def whatif_table(rows: Sequence[dict], *, title: str = "What-if: predicted cost per step") -> Table:
    """What-if rows grouped by worker count; in each group the K-FAC variant with the least step
    time is marked with * (plain SGD, which has no second-order part, is there for reference)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="per worker per step: traffic = bytes sent + received; memory = the "
                          "busiest worker's gradient + second-order state; compute = its K-FAC "
                          "compute; * fastest K-FAC variant")
    for name in ("workers", "algorithm", "step time", "2nd order", "compute", "traffic",
                 "memory"):
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
                          format_seconds(row.get("second_order_compute_s", 0.0)),
                          format_bytes(row["comm_bytes_per_step"]),
                          format_bytes(row["memory_bytes_per_worker"]),
                          style="bold green" if best else None,
                          end_section=index < len(groups) - 1 and row is group[-1])
    return table


def setting_title(settings: dict) -> str:
    """One line naming a what-if point's settings (batch, bandwidth, frequencies, topology)."""
    parts = [f"batch {settings['batch_size']}/worker",
             f"bandwidth x{settings['bandwidth_scale']:g}",
             f"factor update every {settings['factor_update_freq']}",
             f"inverse update every {settings['inv_update_freq']}"]
    if settings.get("gpus_per_node"):
        parts.append(f"{settings['gpus_per_node']} GPUs per node")
    return ", ".join(parts)


def knee_lines(knees: dict, *, workers: Sequence[int], efficiency: float) -> list[str]:
    """Sentences naming each algorithm's scaling knee."""
    top = max(workers)
    lines = []
    for name, knee in knees.items():
        if knee is None:
            lines.append(f"  {name}: adding workers pays all the way to {top}")
        else:
            lines.append(f"  {name}: knee at {knee} workers (beyond, each step adds < "
                         f"{efficiency:.0%} of the ideal throughput gain)")
    return lines


def print_whatif_table(rows: Sequence[dict], *, console: Console,
                       efficiency: float = 0.5) -> None:
    """Print one what-if table per setting, each followed by the scaling knees."""
    from planner.whatif.sweep import knees, setting_groups

    groups = setting_groups(rows)
    for settings, members in groups:
        title = "What-if: predicted cost per step"
        if settings.get("batch_size") is not None:
            title += f" ({setting_title(settings)})"
        console.print(whatif_table(members, title=title))
        found = knees(members, efficiency=efficiency)
        console.print("Scaling knee (weak scaling, throughput = workers / step time):",
                      highlight=False)
        for line in knee_lines(found, workers=[r["workers"] for r in members],
                               efficiency=efficiency):
            console.print(line, highlight=False)


LINE_STYLES = ("-", "--", "-.", ":")  # algorithms that coincide stay visible
PLOT_METRICS = (("step_time_s", "step time (s)"), ("memory_bytes_per_worker",
                "memory per worker (bytes)"), ("comm_bytes_per_step", "traffic per worker "
                                                                      "per step (bytes)"))


def write_whatif_plot(rows: Sequence[dict], path, *, title: str,
                      knees: dict | None = None) -> None:
    """Step time, memory and traffic against worker count (log-log), one line per algorithm,
    each algorithm's knee as a hollow marker; a PNG written atomically to `path`. Rows of one
    setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpkfac.core.jsonio import write_atomic

    names = list(dict.fromkeys(r["algorithm"] for r in rows))
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(16, 4.8), constrained_layout=True)
    for ax, (key, label) in zip(axes, PLOT_METRICS):
        for index, name in enumerate(names):
            mine = sorted((r for r in rows if r["algorithm"] == name and r[key] > 0),
                          key=lambda r: r["workers"])  # log axes: zeros (one worker) left out
            xs = [r["workers"] for r in mine]
            ys = [r[key] for r in mine]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name,
                              linestyle=LINE_STYLES[index % len(LINE_STYLES)])
            knee = (knees or {}).get(name)
            if knee is not None and knee in xs:
                ax.plot([knee], [ys[xs.index(knee)]], marker="o", markersize=10,
                        markerfacecolor="none", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, title="hollow circle: knee", title_fontsize=8)
    fig.suptitle(title)
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True)
    plt.close(fig)


def _layers_per_rank(placement: dict) -> dict[int, int]:
    counts: dict[int, int] = {}
    for rank in placement["assignment"].values():
        counts[rank] = counts.get(rank, 0) + 1
    return counts


def validation_table(rows, *, title: str) -> Table:
    """Predicted vs measured seconds per phase (PhaseRow-like rows), with the relative error."""
    table = Table(title=title)
    for name in ("phase", "predicted", "measured", "error"):
        table.add_column(name, justify="left" if name == "phase" else "right", no_wrap=True)
    for row in rows:
        error = row.rel_error
        shown = f"{100 * error:+.1f}%" if error != float("inf") else "n/a"
        style = "bold" if row.phase == "step_time" else None
        table.add_row(row.phase.replace("_", " "), format_seconds(row.predicted_s),
                      format_seconds(row.measured_s), shown, style=style)
    return table
