"""Command-line subcommands that need torch: `profile` and `train` (torch is imported lazily)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpkfac.core.errors import InputError
from dpkfac.core.strategy import TRAIN_ALGORITHMS
from dpkfac.core.units import parse_bytes, parse_link_rate, payload_bytes_per_s, positive_seconds


def register(subparsers) -> None:
    """Add the `profile` and `train` subcommands."""
    _register_profile(subparsers)
    _register_train(subparsers)


def _register_profile(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure per-layer K-FAC costs and collectives",
                              description="Measure, on this machine, each K-FAC layer's factor "
                              "construction, decomposition and preconditioning time and memory; "
                              "under torchrun with >1 process also fit alpha-beta collective costs.")
    p.add_argument("--model", required=True, help="zoo name (digits-cnn, digits-mlp, resnet20, "
                   "resnet32, resnet50, bert-mini) or package.module:callable")
    p.add_argument("--batch-size", type=int, required=True, help="per-worker batch size")
    p.add_argument("--out", required=True, help="profile file to write (JSON)")
    _add_workload_flags(p)
    p.add_argument("--input-shape", type=_shape, default=None, metavar="D1,D2,...",
                   help="profile on synthetic inputs of this per-sample shape (no data at hand); "
                   "e.g. 3,224,224, or a sequence length with --vocab-size")
    p.add_argument("--num-classes", type=int, default=None,
                   help="with --input-shape: class labels in 0..N-1 (default: the model's "
                   "output size)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="with --input-shape: inputs are token ids in 0..V-1")
    p.add_argument("--compute-method", choices=("eigen", "inverse"), default="eigen")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed steps of each kind (overlapped and serial under torchrun; "
                        "trimmed means)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--link-rate", default=None, metavar="RATE",
                   help="the line rate of the links between the workers, as tc writes it "
                   "(e.g. 100mbit, 25gbit); the payload rate TCP gets on it (1448 of every "
                   "1514 bytes) is recorded, so `whatif --bandwidth-scale` speeds up only the "
                   "calls that waited for the wire, not the hosts' latency of the others")
    p.add_argument("--link-burst", default=None, metavar="BYTES",
                   help="with --link-rate, for shaped links: the token bucket as tc's tbf "
                   "writes it (e.g. 62500 or 62.5kb), the bytes that leave at once after an "
                   "idle link; the what-if keeps it as that many seconds of the rate")
    _add_cpu_runtime_flags(p)
    p.set_defaults(func=_run_profile)


def _register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train with DP-KFAC under a placement",
                              description="Train the placement's model on its data (or --model "
                              "/ --data), one process per worker (launch with torchrun; without "
                              "it, world size 1). Writes metrics.jsonl, summary.json and model.pt.")
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
    _add_workload_flags(p, train=True)
    p.add_argument("--batch-size", type=int, default=None,
                   help="per-worker (micro-)batch size (default: the placement's)")
    p.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="micro-batches per optimizer step: gradients summed over K backwards "
                   "(each loss divided by K), K-FAC factors built from all K, the gradient "
                   "preconditioned once per step (default 1)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                   help="run the forward under torch.autocast at this dtype (bf16 on CPU; fp16 "
                   "adds a GradScaler); K-FAC factors and decompositions stay fp32")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate, scaled per step by --lr-schedule (default: 0.1)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: a half cosine to 0 over --epochs, after --lr-warmup-steps "
                   "(default); constant: the base rate at every step")
    p.add_argument("--lr-warmup-steps", type=int, default=None, metavar="STEPS",
                   help="linear warm-up steps before the cosine (default 0: the KL clip "
                   "bounds the early steps; see docs/commands.md)")
    p.add_argument("--damping", type=float, default=None,
                   help="K-FAC damping added to the factors (default: 0.03)")
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
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="the serial step: the gradient all-reduce, then the K-FAC phases (by "
                   "default DP-KFAC owners build factors and decompose while it is in flight; "
                   "the same numbers either way)")
    p.add_argument("--stagger-decompositions", action="store_true",
                   help="follow the placement's staggered decomposition schedule (plan with "
                   "--inv-update-freq K > 1): a lower peak step, not a lower mean")
    _add_cpu_runtime_flags(p)
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=_run_train)


def _add_workload_flags(p: argparse.ArgumentParser, *, train: bool = False) -> None:
    """--data and --loss, which `profile` records and `train` takes from the placement."""
    default = "the placement's" if train else "the model's own: digits for digits-*, " \
        "synthetic for the other zoo models and digits for a user's model"
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="digits, synthetic, a .npz file with x_train, y_train, x_test, y_test, "
                   "or package.module:callable returning (train_dataset, test_dataset) of "
                   f"(input, target) pairs (default: {default})")
    p.add_argument("--loss", default=None, metavar="CALLABLE",
                   help="package.module:callable called as loss(output, target) -> scalar "
                   f"(default: {'the placement' + chr(39) + 's, else ' if train else ''}"
                   "cross-entropy over the last dimension)")


def _shape(text: str) -> list[int]:
    """`3,32,32` -> [3, 32, 32] (positive integers)."""
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,32,32, got {text!r}")
    return dims


def _add_cpu_runtime_flags(p: argparse.ArgumentParser) -> None:
    """The CPU speed settings `train` and `profile` share (executor/runtime/cpu_runtime.py)."""
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush subnormal floats to zero on CPU (they can make K-FAC "
                   "steps several times slower; flushing is the default)")
    p.add_argument("--release-freed-memory", action="store_true",
                   help="let glibc's malloc return freed memory to the kernel (default: keep it "
                   "for reuse, so large temporaries are not page-faulted in every step)")


def _link_burst_s(burst: str | None, rate: str | None) -> float:
    """Seconds of the line rate `rate` a tbf bucket of `burst` bytes holds; 0 without one."""
    if burst is None:
        return 0.0
    if rate is None:
        raise InputError("--link-burst needs --link-rate (the rate the bucket fills at)")
    return parse_bytes(burst, what="--link-burst") / parse_link_rate(rate, what="--link-rate")


def _run_profile(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"--out: folder {str(out.parent)!r} does not exist")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.repeats < 3 or args.warmup < 0:
        raise InputError("--repeats must be >= 3 and --warmup >= 0")
    link = payload_bytes_per_s(args.link_rate, what="--link-rate") if args.link_rate else None
    burst_s = _link_burst_s(args.link_burst, args.link_rate)
    for flag, value in (("--num-classes", args.num_classes), ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    import torch

    from dpkfac.core.jsonio import write_json_atomic
    from dpkfac.core.profile import profile_from_dict

    from .profiling import ProfileOptions, profile_module
    from .runtime.distributed import init_distributed, shutdown_distributed
    from .workload import data_entry, prepare_workload
    from .workload.loaders import consecutive_batches

    torch.manual_seed(0)
    entry = data_entry(args.data, args.model, input_shape=args.input_shape,
                       num_classes=args.num_classes, vocab_size=args.vocab_size)
    work = prepare_workload(args.model, entry, args.loss)  # bad input fails before the group
    options = ProfileOptions(compute_method=args.compute_method, warmup=args.warmup,
                             repeats=args.repeats, flush_denormal=not args.keep_denormals,
                             keep_freed_memory=not args.release_freed_memory,
                             link_bytes_per_s=link, link_burst_s=burst_s)
    world = init_distributed(device=args.device)
    try:
        batches = consecutive_batches(work.split.train, args.batch_size, options.factor_batches,
                                      world.device)
        doc = profile_module(work.model.to(world.device), batches, world, loss_fn=work.loss_fn,
                             workload=work.record(), options=options,
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
                      model=args.model, data=args.data, loss=args.loss,
                      accumulate=args.accumulate, autocast=args.autocast,
                      batch_size=args.batch_size, lr_schedule=args.lr_schedule,
                      lr_warmup_steps=args.lr_warmup_steps,
                      checkpoint_every=args.checkpoint_every, resume=args.resume,
                      timeout_s=args.timeout,
                      precise_timing=args.precise_timing,
                      stagger_decompositions=args.stagger_decompositions,
                      overlap=args.overlap,
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
    accuracy = summary["test_accuracy"]
    tested = f"test loss {summary['test_loss']:.4f}" + \
        (f", accuracy {100 * accuracy:.2f}%" if accuracy is not None else "")
    print(f"{summary.get('variant', summary['algorithm'])} on {summary['world_size']} "
          f"worker(s): {summary['steps']} steps, "
          f"final loss {'n/a' if loss is None else f'{loss:.4f}'}, {tested}, mean step "
          f"{'n/a' if step_s is None else f'{1e3 * step_s:.2f} ms'}, "
          f"second-order memory per rank {summary['second_order_memory_bytes']} B, "
          f"traffic {summary['comm_bytes_per_step']['total']:,.0f} B/step"
          f"{f', numerical events {numerics}' if numerics else ''}; wrote {out}")
