"""Accuracy floor: DP-KFAC vs plain SGD, same model, workers, epochs and batch size.

Runs the user's path (profile under torchrun -> plan -> train under torchrun) for DP-KFAC and
SGD, prints a table and exits 1 when DP-KFAC's test accuracy is below the floor.

    python bench/accuracy.py [--model digits-cnn] [--workers 2] [--epochs 10] [--floor 0.95]
                             [--docs-out docs/results/accuracy.md | --no-docs]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from common import ResultsDoc, add_docs_arguments, dpkfac_command, docs_out, rich_table, run_timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--floor", type=float, default=0.95)
    add_docs_arguments(parser, "accuracy")
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
    title = (f"{args.model}, {args.workers} gloo workers, {args.epochs} epochs, "
             f"batch {args.batch_size}/worker")
    headers = ["algorithm", "test accuracy", "final loss", "mean step ms", "wall s"]
    cells = [[algorithm, f"{100 * summary['test_accuracy']:.2f}%", f"{summary['final_loss']:.4f}",
              f"{1e3 * summary['mean_step_time_s']:.2f}", f"{wall:.1f}"]
             for algorithm, (summary, wall) in rows.items()]
    Console(width=100).print(rich_table(title, headers, cells, left=("algorithm",)))
    accuracy = rows["dp-kfac"][0]["test_accuracy"]
    failures = ([f"dp-kfac test accuracy {accuracy:.4f} < floor {args.floor}"]
                if accuracy < args.floor else [])
    doc = ResultsDoc("accuracy", "Accuracy: DP-KFAC vs SGD",
                     floors=f"DP-KFAC's test accuracy >= {args.floor} (`--floor`); "
                            "the bench exits 1 below it.")
    doc.text("The user's path: `dpkfac profile` under torchrun, `dpkfac plan`, then `dpkfac "
             "train` under torchrun for each algorithm with the same placement; default "
             "hyper-parameters (lr 0.1 on a cosine to 0, momentum 0.9, weight decay 5e-4, "
             "K-FAC damping 0.03).")
    doc.table(headers, cells, title=title, left=("algorithm",),
              note="mean step: steady-state mean step time (summary.json); wall: the whole "
                   "`dpkfac train` command, start-up included.")
    doc.write(docs_out(args), failures)
    if failures:
        print(f"FAIL: {failures[0]}")
        return 1
    print(f"ok: dp-kfac test accuracy {accuracy:.4f} >= floor {args.floor}")
    shutil.rmtree(work, ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
