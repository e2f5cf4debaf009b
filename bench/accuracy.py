"""Accuracy floor: DP-KFAC vs plain SGD, same model, workers, epochs and batch size.

Runs the user's path (profile under torchrun -> plan -> train under torchrun) for DP-KFAC and
SGD, prints a table and exits 1 when DP-KFAC's test accuracy is below the floor.

    python bench/accuracy.py [--model digits-cnn] [--workers 2] [--epochs 10] [--floor 0.95]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import dpkfac_command, run_timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--floor", type=float, default=0.95)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpkfac-bench-"))
    profile, placement = work / "profile.json", work / "placement.json"
    run_timed(dpkfac_command(args.workers, "profile", "--model", args.model, "--batch-size",
                             str(args.batch_size), "--out", str(profile)))
    run_timed(dpkfac_command(1, "plan", "--profile", str(profile), "--workers",
                             str(args.workers), "--out", str(placement)))
    rows = {}
    for algorithm in ("dp-kfac", "sgd"):
        out = work / algorithm
        wall, _ = run_timed(dpkfac_command(args.workers, "train", "--placement", str(placement),
                                           "--out", str(out), "--epochs", str(args.epochs),
                                           "--algorithm", algorithm, "--no-progress"))
        rows[algorithm] = (json.loads((out / "summary.json").read_text()), wall)
    table = Table(title=f"{args.model}, {args.workers} gloo workers, {args.epochs} epochs, "
                        f"batch {args.batch_size}/worker")
    for col in ("algorithm", "test accuracy", "final loss", "mean step ms", "wall s"):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for algorithm, (summary, wall) in rows.items():
        table.add_row(algorithm, f"{100 * summary['test_accuracy']:.2f}%",
                      f"{summary['final_loss']:.4f}", f"{1e3 * summary['mean_step_time_s']:.2f}",
                      f"{wall:.1f}")
    Console(width=100).print(table)
    accuracy = rows["dp-kfac"][0]["test_accuracy"]
    if accuracy < args.floor:
        print(f"FAIL: dp-kfac test accuracy {accuracy:.4f} < floor {args.floor}")
        return 1
    print(f"ok: dp-kfac test accuracy {accuracy:.4f} >= floor {args.floor}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
