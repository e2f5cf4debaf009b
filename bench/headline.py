"""The seed's headline, ours: DP-KFAC against MPD-KFAC and KAISA per second-order update.

1. Predicted, ResNet-50 (profiles/resnet50.b32.analytic-16x4-ib100.json, real layer shapes,
   analytic costs calibrated to the published D-KFAC breakdown) at 64 workers: computation
   (busiest worker's K-FAC compute per step), communication (bytes a worker sends + receives per
   step, all collectives; and the second-order collectives alone) and memory (busiest worker's
   gradient + second-order state; and the state alone) ratios baseline / DP-KFAC, next to the
   seed's 1.55-1.65x, 2.79-3.15x and 1.14-1.47x.
2. Measured: `dpkfac train` under torchrun with 2 and 4 gloo workers on digits-cnn and digits-mlp
   for every algorithm (same placement), the same ratios from summary.json next to the what-if
   prediction for the same setting (the measured profiles in profiles/, the run's owners).
3. The what-if sweep 1..4096 workers x all algorithms on the ResNet-50 profile, timed.

Floors (exit status 1 below any): at 64 workers on ResNet-50 DP-KFAC moves >= 2.79x fewer bytes
per step than MPD-KFAC and its busiest worker holds >= 1.14x less memory; measured at 2 workers
DP-KFAC moves fewer bytes than MPD-KFAC and the predicted ratio is within 5% of the measured one;
every predicted traffic within 5% of the measured one (bytes are exact: any gap is a modelling
bug); the sweep within 5 s.

    .venv/bin/python bench/headline.py [--workers 2,4] [--models digits-cnn,digits-mlp]
                                       [--docs-out docs/results/headline.md | --no-docs]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rich.console import Console  # noqa: E402

from common import (ResultsDoc, add_docs_arguments, docs_out, dpkfac_command,  # noqa: E402
                    rich_table, run_timed)
from planner.whatif.baselines import algorithm_cost  # noqa: E402
from planner.model.costs import PlanConfig  # noqa: E402
from dpkfac.core.placement import load_placement  # noqa: E402
from dpkfac.core.profile import Profile, load_profile  # noqa: E402
from planner.whatif.sweep import Sweep, expand_workers, sweep_rows  # noqa: E402

RESNET50 = ROOT / "profiles" / "resnet50.b32.analytic-16x4-ib100.json"
MEASURED_PROFILE = "profiles/{model}.b32.cpu2-gloo.json"
SEED = {"computation": "1.55-1.65x", "communication": "2.79-3.15x", "memory": "1.14-1.47x"}
BASELINES = ("mpd-kfac", "kaisa-comm-opt", "kaisa-mem-opt")
# (what-if algorithm name) -> `dpkfac train` flags
TRAIN_FLAGS = {"dp-kfac": ["--algorithm", "dp-kfac"], "mpd-kfac": ["--algorithm", "mpd-kfac"],
               "kaisa-comm-opt": ["--algorithm", "kaisa", "--grad-worker-fraction", "1"],
               "kaisa-mem-opt": ["--algorithm", "kaisa", "--grad-worker-fraction", "1/{p}"]}
FLOOR_TRAFFIC, FLOOR_MEMORY, TOLERANCE, SWEEP_LIMIT_S = 2.79, 1.14, 0.05, 5.0


def ratio(base: float, mine: float) -> float:
    """base / mine (inf when mine is 0 and base is not; 1 when both are 0)."""
    if mine == 0:
        return 1.0 if base == 0 else float("inf")
    return base / mine


# ----------------------------------------------------------------------------- predicted, 64

def predicted_headline(profile: Profile, *, workers: int) -> dict[str, dict]:
    """Every K-FAC algorithm's predicted cost row at `workers` (dp-kfac planned)."""
    rows = sweep_rows(profile, Sweep(workers=(workers,),
                                     algorithms=("dp-kfac", "dp-kfac-round-robin", *BASELINES)))
    return {r["algorithm"]: r for r in rows}


HEADLINE_HEADERS = ["vs", "computation", "communication", "(2nd-order only)", "memory",
                    "(state only)"]
HEADLINE_NOTE = ("computation: busiest worker's K-FAC compute per step; communication: bytes a "
                 "worker sends + receives per step (all collectives; 2nd-order only: without "
                 "the gradient all-reduce); memory: busiest worker's gradient + 2nd-order state "
                 "(the seed's memory counts the whole GPU footprint, which dilutes the ratio)")


def headline_title(workers: int) -> str:
    return (f"ResNet-50, {workers} workers (predicted, analytic profile): "
            "baseline / DP-KFAC per second-order update")


def headline_cells(rows: dict[str, dict]) -> list[list[str]]:
    """Baseline / DP-KFAC ratios per second-order update, with the seed's figures last."""
    dp = rows["dp-kfac"]
    cells = []
    for base in (*BASELINES, "dp-kfac-round-robin"):
        r = rows[base]
        cells.append([base,
                      f"{ratio(r['second_order_compute_s'], dp['second_order_compute_s']):.2f}x",
                      f"{ratio(r['comm_bytes_per_step'], dp['comm_bytes_per_step']):.2f}x",
                      f"{ratio(_second_order_bytes(r), _second_order_bytes(dp)):.2f}x",
                      f"{ratio(r['memory_bytes_per_worker'], dp['memory_bytes_per_worker']):.2f}x",
                      f"{ratio(r['second_order_memory_bytes'], dp['second_order_memory_bytes']):.2f}x"])
    cells.append(["seed (vs D-KFAC, 64 GPUs)", SEED["computation"], SEED["communication"], "",
                  SEED["memory"], ""])
    return cells


def _second_order_bytes(row: dict) -> float:
    return row["comm_bytes_per_step"] - row["comm_gradient_allreduce_bytes"]


# ----------------------------------------------------------------------------- measured

def plan(profile_path: str, workers: int, out: Path) -> dict:
    """`dpkfac plan` for `workers` (the placement every algorithm of the run shares)."""
    run_timed(dpkfac_command(1, "plan", "--profile", profile_path, "--workers", str(workers),
                             "--out", str(out)))
    return load_placement(out)


def train(placement: Path, algorithm: str, workers: int, out: Path, steps: int) -> dict:
    """One `dpkfac train` run under torchrun; its summary.json."""
    flags = [f.replace("{p}", str(workers)) for f in TRAIN_FLAGS[algorithm]]
    run_timed(dpkfac_command(workers, "train", "--placement", str(placement), "--out", str(out),
                             "--max-steps", str(steps), "--epochs", "1", "--no-progress", *flags))
    return json.loads((out / "summary.json").read_text())


def measured_compute_s(summary: dict) -> float:
    """The busiest rank's mean K-FAC compute per step (factors, decompositions, precondition)."""
    return max(r.get("factors_s", 0) + r.get("decompose_s", 0) + r.get("precondition_s", 0)
               for r in summary["phase_means_by_rank_s"])


def measure(model: str, workers: int, *, steps: int, folder: Path) -> list[dict]:
    """Measured and predicted traffic, memory and compute of every algorithm on one setting."""
    profile_path = MEASURED_PROFILE.format(model=model)
    profile = load_profile(ROOT / profile_path)
    placement_path = folder / f"{model}-{workers}.placement.json"
    placement = plan(str(ROOT / profile_path), workers, placement_path)
    owners = [placement["assignment"][layer.name] for layer in profile.layers]
    config = PlanConfig(factor_update_freq=placement["config"]["factor_update_freq"],
                        inv_update_freq=placement["config"]["inv_update_freq"])
    results = []
    for algorithm in ("dp-kfac", *BASELINES):
        summary = train(placement_path, algorithm, workers, folder / f"{model}-{workers}-{algorithm}",
                        steps)
        cost = algorithm_cost(profile, algorithm=algorithm, workers=workers, config=config,
                              owners=owners)
        results.append({"model": model, "workers": workers, "algorithm": algorithm,
                        "measured_bytes": summary["comm_bytes_per_step"]["total"],
                        "predicted_bytes": cost.comm_bytes_per_step,
                        "measured_state": max(summary["second_order_memory_bytes"]),
                        "predicted_state": cost.second_order_memory_bytes,
                        "measured_compute_s": measured_compute_s(summary),
                        "predicted_compute_s": cost.second_order_compute_s,
                        "identical": summary["parameters_identical"]})
    return results


MEASURED_TITLE = ("Measured (torchrun, gloo, CPU) vs what-if prediction, same placement: "
                  "baseline / DP-KFAC")
MEASURED_HEADERS = ["model", "P", "vs", "bytes/step meas.", "pred.", "traffic x meas.", "pred.",
                    "state x meas.", "pred.", "compute x meas.", "pred."]
MEASURED_NOTE = ("bytes: per step per worker, sent + received (measured: summary.json "
                 "comm_bytes_per_step.total of rank 0); state: busiest rank's second-order "
                 "state; compute: busiest rank's factors + decompose + precondition "
                 "(measured: mean of the run's steps on 2 shared CPU cores, noisy)")


def measured_cells(results: list[dict]) -> list[list[str]]:
    """Per setting: each algorithm's bytes, and baseline / DP-KFAC ratios measured vs predicted."""
    cells = []
    for (model, workers), group in _by_setting(results).items():
        dp = group["dp-kfac"]
        cells.append([model, str(workers), "dp-kfac", f"{dp['measured_bytes']:,}",
                      f"{dp['predicted_bytes']:,}", "", "", "", "", "", ""])
        for base in BASELINES:
            r = group[base]
            cells.append(["", "", base, f"{r['measured_bytes']:,}", f"{r['predicted_bytes']:,}",
                          f"{ratio(r['measured_bytes'], dp['measured_bytes']):.3f}x",
                          f"{ratio(r['predicted_bytes'], dp['predicted_bytes']):.3f}x",
                          f"{ratio(r['measured_state'], dp['measured_state']):.3f}x",
                          f"{ratio(r['predicted_state'], dp['predicted_state']):.3f}x",
                          f"{ratio(r['measured_compute_s'], dp['measured_compute_s']):.2f}x",
                          f"{ratio(r['predicted_compute_s'], dp['predicted_compute_s']):.2f}x"])
    return cells


def _by_setting(results: list[dict]) -> dict[tuple[str, int], dict[str, dict]]:
    grouped: dict[tuple[str, int], dict[str, dict]] = {}
    for r in results:
        grouped.setdefault((r["model"], r["workers"]), {})[r["algorithm"]] = r
    return grouped


# ----------------------------------------------------------------------------- floors

def floor_failures(headline: dict[str, dict], results: list[dict], sweep_s: float) -> list[str]:
    """Every floor that is not met, as a sentence."""
    failures = []
    dp, mpd = headline["dp-kfac"], headline["mpd-kfac"]
    traffic = ratio(mpd["comm_bytes_per_step"], dp["comm_bytes_per_step"])
    memory = ratio(mpd["memory_bytes_per_worker"], dp["memory_bytes_per_worker"])
    if traffic < FLOOR_TRAFFIC:
        failures.append(f"ResNet-50 at 64: traffic mpd/dp {traffic:.2f}x < {FLOOR_TRAFFIC}x")
    if memory < FLOOR_MEMORY:
        failures.append(f"ResNet-50 at 64: memory mpd/dp {memory:.2f}x < {FLOOR_MEMORY}x")
    for r in results:
        if abs(r["predicted_bytes"] - r["measured_bytes"]) > TOLERANCE * r["measured_bytes"]:
            failures.append(f"{r['model']} at {r['workers']}, {r['algorithm']}: predicted "
                            f"{r['predicted_bytes']} B/step, measured {r['measured_bytes']}")
        if not r["identical"]:
            failures.append(f"{r['model']} at {r['workers']}, {r['algorithm']}: ranks ended "
                            "with different parameters")
    for (model, workers), group in _by_setting(results).items():
        if workers != 2:
            continue
        dp, mpd = group["dp-kfac"], group["mpd-kfac"]
        if not dp["measured_bytes"] < mpd["measured_bytes"]:
            failures.append(f"{model} at 2: dp-kfac does not move fewer bytes than mpd-kfac")
        meas = ratio(mpd["measured_bytes"], dp["measured_bytes"])
        pred = ratio(mpd["predicted_bytes"], dp["predicted_bytes"])
        if abs(pred / meas - 1) > TOLERANCE:
            failures.append(f"{model} at 2: predicted traffic ratio {pred:.3f} vs measured "
                            f"{meas:.3f}")
    if sweep_s > SWEEP_LIMIT_S:
        failures.append(f"what-if sweep 1..4096 took {sweep_s:.2f} s > {SWEEP_LIMIT_S} s")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2,4", help="measured worker counts")
    parser.add_argument("--models", default="digits-cnn,digits-mlp")
    parser.add_argument("--steps", type=int, default=8, help="training steps per measured run")
    add_docs_arguments(parser, "headline")
    args = parser.parse_args()
    console = Console(width=150)
    doc = ResultsDoc("headline", "Headline: DP-KFAC vs MPD-KFAC and KAISA", floors=FLOORS_TEXT)

    resnet = load_profile(RESNET50)
    headline = predicted_headline(resnet, workers=64)
    cells = headline_cells(headline)
    console.print(rich_table(headline_title(64), HEADLINE_HEADERS, cells, left=("vs",),
                             styles=[None] * (len(cells) - 1) + ["dim"]))
    console.print(HEADLINE_NOTE, highlight=False)
    doc.table(HEADLINE_HEADERS, cells, title=headline_title(64), left=("vs",),
              note=f"Profile `{RESNET50.relative_to(ROOT)}`. {HEADLINE_NOTE}.")

    start = time.perf_counter()
    rows = sweep_rows(resnet, Sweep(workers=expand_workers("1..4096")))
    sweep_s = time.perf_counter() - start
    sweep_line = (f"what-if sweep 1..4096 workers (13 sizes) x "
                  f"{len({r['algorithm'] for r in rows})} algorithms on ResNet-50: "
                  f"{sweep_s:.2f} s (limit {SWEEP_LIMIT_S} s)")
    console.print(sweep_line, highlight=False)
    doc.text(f"### What-if sweep\n\n{sweep_line[0].upper()}{sweep_line[1:]}.")

    results = []
    with tempfile.TemporaryDirectory(prefix="dpkfac-headline-") as tmp:
        for model in args.models.split(","):
            for workers in expand_workers(args.workers):
                results.extend(measure(model, workers, steps=args.steps, folder=Path(tmp)))
    if results:
        cells = measured_cells(results)
        ends = [row[2] == BASELINES[-1] for row in cells]
        console.print(rich_table(MEASURED_TITLE, MEASURED_HEADERS, cells, left=("model", "vs"),
                                 no_wrap=True, section_ends=ends))
        console.print(MEASURED_NOTE, highlight=False)
        doc.table(MEASURED_HEADERS, cells, title=MEASURED_TITLE, left=("model", "vs"),
                  note=f"{args.steps} training steps per run. {MEASURED_NOTE}.")
    failures = floor_failures(headline, results, sweep_s)
    for failure in failures:
        console.print(f"[bold red]BELOW FLOOR[/]: {failure}")
    if not failures:
        console.print("[bold green]all floors met[/]")
    doc.write(docs_out(args), failures)
    return 1 if failures else 0


FLOORS_TEXT = f"""The bench exits 1 below any of these:

- ResNet-50 at 64 workers (predicted): DP-KFAC moves >= {FLOOR_TRAFFIC}x fewer bytes per step
  than MPD-KFAC, and its busiest worker holds >= {FLOOR_MEMORY}x less memory;
- measured at 2 workers: DP-KFAC moves fewer bytes than MPD-KFAC, and the predicted ratio is
  within {TOLERANCE:.0%} of the measured one;
- every run's predicted traffic within {TOLERANCE:.0%} of the measured one (bytes are exact: any
  gap is a modelling bug), and every run ends with identical parameters on all ranks;
- the what-if sweep 1..4096 workers within {SWEEP_LIMIT_S:g} s."""

if __name__ == "__main__":
    sys.exit(main())
