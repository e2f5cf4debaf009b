"""Command-line subcommands that need torch: `profile` and `train` (torch is imported lazily)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpkfac.core.errors import InputError
from dpkfac.core.strategy import TRAIN_ALGORITHMS
from dpkfac.core.units import positive_seconds


def register(subparsers) -> None:
    """Add the `profile` and `train` subcommands."""
    _register_profile(subparsers)
    _register_train(subparsers)


def _register_profile(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure per-layer K-FAC costs and collectives",
                              description="Measure, on this machine, each K-FAC layer's factor "
                              "construction, decomposition and preconditioning time and memory; "
                              "under torchrun with >1 process also fit alpha-beta collective costs.")
    p.add_argument("--model", required=True, help="zoo name (digits-cnn, digits-mlp) or "
                   "package.module:callable")
    p.add_argument("--batch-size", type=int, required=True, help="per-worker batch size")
    p.add_argument("--out", required=True, help="profile file to write (JSON)")
    p.add_argument("--compute-method", choices=("eigen", "inverse"), default="eigen")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per kernel (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_cpu_runtime_flags(p)
    p.set_defaults(func=_run_profile)


def _register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train with DP-KFAC under a placement",
                              description="Train the placement's model on the digits data set, "
                              "one process per worker (launch with torchrun; without it, world "
                              "size 1).")
    p.add_argument("--placement", required=True, help="placement file (dpkfac.placement/1)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, summary.json, "
                   "checkpoint.pt")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--algorithm", choices=TRAIN_ALGORITHMS, default="dp-kfac",
                   help="dp-kfac (owners build factors from their own batch, precondition and "
                   "broadcast; default), mpd-kfac (factors built by all and all-reduced, owners "
                   "precondition and broadcast), kaisa (factors all-reduced; see "
                   "--grad-worker-fraction), sgd (no K-FAC)")
    p.add_argument("--grad-worker-fraction", default=None, metavar="F",
                   help="kaisa only: 1 = COMM-OPT (decompositions broadcast, everyone "
                   "preconditions; default), 1/P = MEM-OPT (owner preconditions and broadcasts "
                   "the result); e.g. 1, 0.5, 1/4. HYBRID fractions in between are not "
                   "implemented and are refused")
    p.add_argument("--model", default=None, help="override the placement's model")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per-worker batch size (default: the placement's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.1)")
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--kl-clip", type=float, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS")
    p.add_argument("--resume", nargs="?", const="always", default="never",
                   choices=("always", "auto", "never"), metavar="auto",
                   help="continue exactly from DIR/checkpoint.pt; `--resume auto` only when it "
                   "exists (a torchrun elastic restart resumes as `auto` does)")
    p.add_argument("--timeout", type=positive_seconds, default=600.0, metavar="SECONDS",
                   help="process-group timeout: a collective waiting longer (a dead or stuck "
                   "rank) ends the job with an error naming the step and phase (default 600)")
    p.add_argument("--precise-timing", action="store_true",
                   help="synchronise the device around each phase (exact phase times, slower)")
    p.add_argument("--stagger-decompositions", action="store_true",
                   help="follow the placement's staggered decomposition schedule (plan with "
                   "--inv-update-freq K > 1): a lower peak step, not a lower mean")
    _add_cpu_runtime_flags(p)
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=_run_train)


def _add_cpu_runtime_flags(p: argparse.ArgumentParser) -> None:
    """The CPU speed settings `train` and `profile` share (executor/runtime/cpu_runtime.py)."""
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush subnormal floats to zero on CPU (they can make K-FAC "
                   "steps several times slower; flushing is the default)")
    p.add_argument("--release-freed-memory", action="store_true",
                   help="let glibc's malloc return freed memory to the kernel (default: keep it "
                   "for reuse, so large temporaries are not page-faulted in every step)")


def _run_profile(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"--out: folder {str(out.parent)!r} does not exist")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.repeats < 3 or args.warmup < 0:
        raise InputError("--repeats must be >= 3 and --warmup >= 0")
    from dpkfac.core.jsonio import write_json_atomic
    from dpkfac.core.profile import profile_from_dict

    from .models import build_model_checked
    from .profiling import ProfileOptions, profile_model
    from .runtime.distributed import init_distributed, shutdown_distributed

    build_model_checked(args.model)  # an unknown model fails before any process group forms
    world = init_distributed(device=args.device)
    try:
        options = ProfileOptions(compute_method=args.compute_method, warmup=args.warmup,
                                 repeats=args.repeats, flush_denormal=not args.keep_denormals,
                                 keep_freed_memory=not args.release_freed_memory)
        doc = profile_model(args.model, args.batch_size, world, options=options,
                            progress=world.rank == 0 and sys.stderr.isatty())
    finally:
        shutdown_distributed()
    if world.rank == 0:
        profile_from_dict(doc, source="measured profile")  # never write an invalid file
        write_json_atomic(out, doc)
        _print_profile(doc, out)
    return 0


def _print_profile(doc: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"profile of {doc['model']} (batch {doc['batch_size']}, {doc['device']})")
    for col in ("layer", "A x G", "factors ms", "decompose ms", "precondition ms", "state KiB"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for l in doc["layers"]:
        table.add_row(l["name"], f"{l['dim_a']} x {l['dim_g']}",
                      f"{1e3 * (l['factor_a_s'] + l['factor_g_s']):.3f}",
                      f"{1e3 * (l['decompose_a_s'] + l['decompose_g_s']):.3f}",
                      f"{1e3 * l['precondition_s']:.3f}", f"{l['state_bytes'] / 1024:.1f}")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    comm = doc["comm"]
    console.print(f"forward+backward {1e3 * doc['step']['forward_backward_s']:.3f} ms; "
                  f"comm ({comm['source']}, {comm['world_size']} ranks): all-reduce "
                  f"alpha {comm['allreduce']['alpha_s'] * 1e6:.1f} us, "
                  f"{_gbps(comm['allreduce']['beta_s_per_byte'])}; broadcast alpha "
                  f"{comm['broadcast']['alpha_s'] * 1e6:.1f} us, "
                  f"{_gbps(comm['broadcast']['beta_s_per_byte'])}")
    console.print(f"wrote {out}")


def _gbps(beta: float) -> str:
    return f"{1e-9 / beta:.2f} GB/s" if beta > 0 else "bandwidth not resolved"


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, run_training

    overrides = {k: v for k, v in (("lr", args.lr), ("damping", args.damping),
                                   ("kl_clip", args.kl_clip)) if v is not None}
    cfg = TrainConfig(placement=args.placement, out_dir=args.out, epochs=args.epochs,
                      max_steps=args.max_steps, seed=args.seed, algorithm=args.algorithm,
                      grad_worker_fraction=args.grad_worker_fraction,
                      model=args.model, batch_size=args.batch_size,
                      checkpoint_every=args.checkpoint_every, resume=args.resume,
                      timeout_s=args.timeout,
                      precise_timing=args.precise_timing,
                      stagger_decompositions=args.stagger_decompositions,
                      flush_denormal=not args.keep_denormals,
                      keep_freed_memory=not args.release_freed_memory,
                      progress=False if args.no_progress else None, **overrides)
    _print_summary(run_training(cfg), args.out)
    return 0


def _print_summary(summary: dict, out: str) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    loss, step_s = summary["final_loss"], summary["mean_step_time_s"]
    numerics = {k: v for k, v in summary.get("numerics", {}).items() if v}
    print(f"{summary.get('variant', summary['algorithm'])} on {summary['world_size']} worker(s): {summary['steps']} steps, "
          f"final loss {'n/a' if loss is None else f'{loss:.4f}'}, test accuracy "
          f"{100 * summary['test_accuracy']:.2f}%, mean step "
          f"{'n/a' if step_s is None else f'{1e3 * step_s:.2f} ms'}, "
          f"second-order memory per rank {summary['second_order_memory_bytes']} B, "
          f"traffic {summary['comm_bytes_per_step']['total']:,.0f} B/step"
          f"{f', numerical events {numerics}' if numerics else ''}; wrote {out}")
