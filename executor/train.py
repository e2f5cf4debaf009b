"""`dpkfac train`: data-parallel training under a fixed placement, one process per worker.

Reliability (README "Reliability"):
- before any training, every rank's fingerprint (placement hash, model, layer names, world size,
  algorithm, seed and hyper-parameters) is compared; a mismatch is an InputError on every rank;
- a checkpoint (`--checkpoint-every`) holds all that a bit-exact continuation needs; `--resume`
  (mode "always") requires DIR/checkpoint.pt, "auto" resumes when it exists; a torchrun elastic
  restart (TORCHELASTIC_RESTART_COUNT > 0) resumes as "auto" does;
- a step whose averaged loss or gradient is NaN/inf is skipped on every rank alike (the loss
  rides in the gradient all-reduce, so all ranks see the same values) and counted;
- a collective that fails or exceeds `timeout_s` ends the run with a RunFault naming the step
  and phase.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import write_atomic, write_json_atomic
from dpkfac.core.step import ring_allreduce_bytes
from dpkfac.core.placement import check_placement_matches, load_placement
from dpkfac.core.strategy import STRATEGY_OF, Strategy, kaisa_variant, parse_fraction

from .blocks import kfac_layers
from .checkpoint import (CHECKPOINT_NAME, checkpoint_exists, load_checkpoint,
                         remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from .cpu_runtime import flushed_denormals, keep_freed_memory
from .data import load_split, test_loader, train_loader
from .distributed import (WorldInfo, average_gradients_, broadcast_object, init_distributed,
                          shutdown_distributed)
from .faults import RunFault, RunPosition, fault_message
from .models import build_model, input_spec
from .preconditioner import COMM_KINDS, NUMERICS_COUNTERS, PHASES, KFACPreconditioner
from .timing import synchronize_device

ALGORITHMS = ("dp-kfac", "mpd-kfac", "kaisa", "sgd")
RESUME_MODES = ("never", "always", "auto")
# Fingerprint fields a resumed run must share with the run that wrote the checkpoint (the rest,
# e.g. epochs or max_steps, may change between the two).
TRAJECTORY_KEYS = ("plan_sha256", "model", "layers_sha256", "world_size", "algorithm",
                   "grad_worker_fraction", "seed", "batch_size", "lr", "momentum", "weight_decay",
                   "damping", "kl_clip", "factor_decay")
# Phases in which a RuntimeError means a collective failed (not a bug in local computation).
COLLECTIVE_PHASES = ("start-up", "resume", "allreduce", "second_order/broadcast", "checkpoint",
                     "summary")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told. Learning rates are per step; times in seconds."""
    placement: str
    out_dir: str
    epochs: int = 10
    max_steps: int | None = None
    seed: int = 0
    algorithm: str = "dp-kfac"
    grad_worker_fraction: str | None = None  # KAISA only: "1" (COMM-OPT, default) or "1/P"
    model: str | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float = 0.003
    kl_clip: float = 0.001
    factor_decay: float = 0.95
    checkpoint_every: int | None = None
    resume: bool | str = False  # False/"never", True/"always" (needs DIR/checkpoint.pt), "auto"
    timeout_s: float = 600.0    # process-group timeout: a collective waits at most this long
    warmup_steps: int = 5
    flush_denormal: bool = True  # flush subnormal floats to zero on CPU (see cpu_runtime)
    keep_freed_memory: bool = True  # malloc keeps freed memory: no page faults (cpu_runtime)
    precise_timing: bool = False
    stagger_decompositions: bool = False
    progress: bool | None = None


class StepClock:
    """Wall-clock marks in seconds; `synchronize` waits for the device before each mark."""

    def __init__(self, synchronize: bool) -> None:
        self.synchronize = synchronize

    def mark(self) -> float:
        if self.synchronize:
            synchronize_device()
        return time.perf_counter()


def run_training(cfg: TrainConfig) -> dict:
    """Train; return the summary (rank 0 also writes it with metrics and checkpoints).

    Raises InputError for bad input (on every rank alike once the process group is up) and
    RunFault when a collective fails or times out (a dead or stuck rank).
    """
    _check_config(cfg)
    placement = load_placement(cfg.placement)
    model_name = cfg.model or placement["model"]
    layer_names = [n for n, _ in kfac_layers(build_model_checked(model_name))]
    check_placement_matches(placement, layer_names=layer_names,
                            world_size=None, source=f"placement {cfg.placement!r}")
    world = init_distributed(timeout_s=cfg.timeout_s)
    position = RunPosition()
    broken = False  # a failed collective leaves the process group unusable
    try:
        _check_world(placement, world, cfg)
        fingerprint = run_fingerprint(cfg, placement, model_name, layer_names, world)
        _agree_on_fingerprint(fingerprint, world)
        malloc = keep_freed_memory() if cfg.keep_freed_memory else {}
        with flushed_denormals(cfg.flush_denormal) as flushing:
            return _train(cfg, placement, model_name, world, position, fingerprint,
                          dict(flush_denormal=flushing, malloc=malloc))
    except RuntimeError as exc:
        if world.world_size > 1 and _is_collective_failure(exc, position):
            broken = True
            raise RunFault(fault_message(rank=world.rank, world_size=world.world_size,
                                         position=position, timeout_s=cfg.timeout_s,
                                         cause=exc)) from None
        raise
    finally:
        if not broken:  # tearing down a broken gloo group can abort the process (its threads
            shutdown_distributed()  # are left joinable): the fault path exits without it


def build_model_checked(name: str) -> nn.Module:
    """build_model, with any failure of a user's `package.module:callable` (an exception in its
    import or its call) turned into an InputError naming the model."""
    try:
        return build_model(name)
    except InputError:
        raise
    except Exception as exc:  # a user's module can raise anything while importing or building
        detail = " ".join(str(exc).split())[:200]
        raise InputError(f"model {name!r} could not be built: {type(exc).__name__}: "
                         f"{detail}") from None


def _is_collective_failure(exc: RuntimeError, position: RunPosition) -> bool:
    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(exc, dist_error)) or \
        position.phase in COLLECTIVE_PHASES


def resume_mode(cfg: TrainConfig) -> str:
    """"never", "always" or "auto"; a torchrun elastic restart turns "never" into "auto"."""
    if isinstance(cfg.resume, bool):
        mode = "always" if cfg.resume else "never"
    else:
        mode = cfg.resume
    if mode == "never" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return mode


def _check_config(cfg: TrainConfig) -> None:
    if cfg.algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {cfg.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if cfg.grad_worker_fraction is not None:
        if cfg.algorithm != "kaisa":
            raise InputError("--grad-worker-fraction applies to --algorithm kaisa only")
        parse_fraction(cfg.grad_worker_fraction)
    for flag, value in (("--epochs", cfg.epochs), ("--max-steps", cfg.max_steps),
                        ("--checkpoint-every", cfg.checkpoint_every),
                        ("--batch-size", cfg.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if not (isinstance(cfg.resume, bool) or cfg.resume in RESUME_MODES):
        raise InputError(f"--resume {cfg.resume!r}: expected one of {', '.join(RESUME_MODES)}")
    if not 0 < cfg.timeout_s < float("inf"):
        raise InputError(f"--timeout must be a positive number of seconds, got {cfg.timeout_s}")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {cfg.out_dir!r} exists and is not a folder")
    if not out.parent.is_dir():
        raise InputError(f"--out {cfg.out_dir!r}: parent folder {str(out.parent)!r} does not exist")
    if resume_mode(cfg) == "always" and not launched_world_is_multi() \
            and not checkpoint_exists(out):
        raise InputError(f"--resume: checkpoint {str(out / CHECKPOINT_NAME)!r} does not exist")


def launched_world_is_multi() -> bool:
    """True when launched with more than one process (rank 0 then checks the checkpoint, so
    ranks on machines without the file still start)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def run_fingerprint(cfg: TrainConfig, placement: dict, model_name: str,
                    layer_names: list[str], world: WorldInfo) -> dict:
    """What every rank of one run must agree on, hashed where long."""
    plan = {"assignment": placement["assignment"], "config": placement["config"]}
    return {
        "placement_sha256": _sha256_json(placement), "plan_sha256": _sha256_json(plan),
        "model": model_name, "layers_sha256": _sha256_json(layer_names),
        "world_size": world.world_size, "algorithm": cfg.algorithm,
        "grad_worker_fraction": cfg.grad_worker_fraction if cfg.algorithm == "kaisa" else None,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size or placement["config"].get("batch_size", 32),
        "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
        "damping": cfg.damping, "kl_clip": cfg.kl_clip, "factor_decay": cfg.factor_decay,
        "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "checkpoint_every": cfg.checkpoint_every, "resume": resume_mode(cfg),
        "flush_denormal": cfg.flush_denormal,
    }


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _agree_on_fingerprint(fingerprint: dict, world: WorldInfo) -> None:
    """InputError on every rank, before any training, unless all ranks' fingerprints match."""
    prints = _all_gather_object(fingerprint, world)
    for key in fingerprint:
        values = [p.get(key) for p in prints]
        if len({json.dumps(v) for v in values}) > 1:
            shown = ", ".join(f"rank {r} has {_short(v)}" for r, v in enumerate(values))
            raise InputError(f"ranks disagree at start-up, nothing was trained: field {key}: "
                             f"{shown} (every rank must get the same placement, model and flags)")


def _short(value: object) -> str:
    text = repr(value)
    return text[:14] + "...'" if isinstance(value, str) and len(value) == 64 else text


def variant_of(cfg: TrainConfig, world_size: int) -> str:
    """The algorithm as it runs: dp-kfac, mpd-kfac, kaisa-comm-opt, kaisa-mem-opt or sgd
    (InputError for a KAISA HYBRID grad-worker fraction, which is not implemented)."""
    if cfg.algorithm != "kaisa":
        return cfg.algorithm
    return kaisa_variant(parse_fraction(cfg.grad_worker_fraction or "1"), workers=world_size)


def strategy_of(cfg: TrainConfig, world_size: int) -> Strategy | None:
    """The preconditioner's strategy, None for sgd."""
    return STRATEGY_OF.get(variant_of(cfg, world_size))


def _check_world(placement: dict, world: WorldInfo, cfg: TrainConfig) -> None:
    variant_of(cfg, world.world_size)  # a HYBRID fraction fails alike on every rank
    if placement["world_size"] != world.world_size:
        raise InputError(f"placement {cfg.placement!r}: field world_size: placement is for "
                         f"{placement['world_size']} workers, this run has {world.world_size} "
                         "process(es) (launch with torchrun --nproc_per_node "
                         f"{placement['world_size']})")


def _train(cfg: TrainConfig, placement: dict, model_name: str, world: WorldInfo,
           position: RunPosition, fingerprint: dict, cpu_runtime: dict) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_model_checked(model_name).to(world.device)  # built after seeding: same init
    _broadcast_parameters(model, world)
    batch_size = cfg.batch_size or placement["config"].get("batch_size", 32)
    split = load_split(input_spec(model_name))
    loader, sampler = train_loader(split.train, batch_size=batch_size, rank=world.rank,
                                   world_size=world.world_size, seed=cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    precond = None
    strategy = strategy_of(cfg, world.world_size)
    if strategy is not None:
        precond = KFACPreconditioner(model, placement, strategy=strategy,
                                     lr=lambda: optimizer.param_groups[0]["lr"],
                                     damping=cfg.damping, factor_decay=cfg.factor_decay,
                                     kl_clip=cfg.kl_clip, precise_timing=cfg.precise_timing,
                                     stagger_decompositions=cfg.stagger_decompositions)
    out = Path(cfg.out_dir)
    position.at("resume")
    start = _start_state(cfg, out, world, model, optimizer, precond, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    total_steps = len(loader) * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    resumed = start["step"] > 0 or start["resumed"]
    if resumed and world.rank == 0:
        _truncate_metrics(out / "metrics.jsonl", before_step=start["step"])
    log = MetricsLog(out / "metrics.jsonl", enabled=world.rank == 0, append=resumed)
    clock = StepClock(cfg.precise_timing)
    step, grad_bytes, skipped = start["step"], 0, start["skipped_steps"]
    here = (start["epoch"], start["batch_in_epoch"])  # where the next step's batch is
    records: list[dict] = []
    with _progress(cfg, world, total_steps, start["step"]) as bar:
        for epoch in range(start["epoch"], cfg.epochs):
            sampler.set_epoch(epoch)
            skip = start["batch_in_epoch"] if epoch == start["epoch"] else 0
            for batch_index, (x, y) in enumerate(loader):
                if batch_index < skip:
                    continue
                if step >= total_steps:
                    break
                position.at("forward_backward", step)
                record, grad_bytes = _train_step(model, optimizer, precond, x.to(world.device),
                                                 y.to(world.device), world, clock, position)
                skipped += int(record["skipped"])
                record.update(step=step, epoch=epoch,
                              numerics=_numerics(precond, skipped))
                records.append(record)
                log.write(record)
                step += 1
                here = _next_position(epoch, batch_index, len(loader))
                if bar is not None:
                    bar.update(bar.task_ids[0], advance=1, description=_loss_text(record["loss"]))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    position.at("checkpoint")
                    _checkpoint(out, world, model, optimizer, precond, step, here, fingerprint,
                                skipped)
            if step >= total_steps:
                break
    log.close()
    position.at("checkpoint")
    if cfg.checkpoint_every or resumed:
        _checkpoint(out, world, model, optimizer, precond, step, here, fingerprint, skipped)
    position.at("summary")
    summary = _summarise(cfg, world, model, precond, records, step, grad_bytes, split, skipped)
    summary["cpu_runtime"] = cpu_runtime
    if world.rank == 0:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _train_step(model, optimizer, precond, x, y, world: WorldInfo, clock: StepClock,
                position: RunPosition):
    """One step; returns its metrics record and the gradient all-reduce buffer bytes.

    A step whose averaged loss or gradients hold NaN/inf is skipped: no preconditioner or
    optimizer step, captured activations dropped. The averaged buffer is bit-identical on every
    rank, so every rank skips the same steps.
    """
    t0 = clock.mark()
    optimizer.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    t1 = clock.mark()
    position.at("allreduce")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    loss_buf = loss.detach().reshape(1).clone()
    grad_bytes, finite = average_gradients_(grads + [loss_buf], world.world_size)
    t2 = clock.mark()
    position.at("second_order")
    if precond is not None and finite:
        try:
            precond.step()
        finally:
            position.at(f"second_order/{precond.current_phase or 'apply'}")
    elif precond is not None:
        precond.discard_captured()
    t3 = clock.mark()
    position.at("optimizer")
    if finite:
        optimizer.step()
    t4 = clock.mark()
    ran = precond is not None and finite
    phases = precond.phase_times if ran else dict.fromkeys(PHASES, 0.0)
    record = {"loss": float(loss_buf) if finite else None, "skipped": not finite,
              "step_time_s": t4 - t0, "forward_backward_s": t1 - t0,
              "allreduce_s": t2 - t1, "second_order_s": t3 - t2, "optimizer_s": t4 - t3,
              **{f"{k}_s": v for k, v in phases.items()}}
    return record, grad_bytes


def _loss_text(loss: float | None) -> str:
    return "loss skipped (not finite)" if loss is None else f"loss {loss:.3f}"


def _numerics(precond: KFACPreconditioner | None, skipped: int) -> dict[str, int]:
    """Cumulative safety-net counters of the whole job (identical on every rank)."""
    counters = precond.numerics if precond is not None else dict.fromkeys(NUMERICS_COUNTERS, 0)
    return {**counters, "skipped_steps": skipped}


def _broadcast_parameters(model: nn.Module, world: WorldInfo) -> None:
    if world.world_size > 1:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


class MetricsLog:
    """metrics.jsonl on rank 0: one JSON object per step, flushed as it goes."""

    def __init__(self, path: Path, *, enabled: bool, append: bool) -> None:
        self._fh = open(path, "a" if append else "w", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _progress(cfg: TrainConfig, world: WorldInfo, total: int, done: int):
    """A rich progress bar on rank 0 when attached to a terminal (or when asked)."""
    wanted = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if world.rank != 0 or not wanted:
        return nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), TimeRemainingColumn(), transient=False)
    bar.add_task("", total=total, completed=done)
    return bar


def _next_position(epoch: int, batch_index: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batch index) of the batch after `batch_index` of `epoch`."""
    if batch_index + 1 >= per_epoch:
        return epoch + 1, 0
    return epoch, batch_index + 1


def _checkpoint(out, world, model, optimizer, precond, step: int, here: tuple[int, int],
                fingerprint: dict, skipped: int) -> None:
    common = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
              "epoch": here[0], "batch_in_epoch": here[1], "skipped_steps": skipped,
              "fingerprint": fingerprint}
    per_rank = {"preconditioner": precond.state_dict() if precond is not None else None,
                "rng": rng_state()}
    save_checkpoint(out, rank=world.rank, world_size=world.world_size, common=common,
                    per_rank=per_rank)


def _start_state(cfg: TrainConfig, out: Path, world: WorldInfo, model, optimizer, precond,
                 fingerprint: dict) -> dict:
    """Where training starts: step 0, or the restored checkpoint's position (exact resume)."""
    payload = _shared_checkpoint(out, world, resume_mode(cfg))
    fresh = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "resumed": False}
    if payload is None:
        if world.rank == 0 and cfg.checkpoint_every and checkpoint_exists(out):
            (out / CHECKPOINT_NAME).unlink()  # a fresh run: an old checkpoint must not be resumed
        return fresh
    where = f"checkpoint {str(out / CHECKPOINT_NAME)!r}"
    _check_trajectory(payload["fingerprint"], fingerprint, where)
    _agree(world, lambda: _restore(payload, world, model, optimizer, precond, where))
    if world.rank == 0 and payload.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        print(f"warning: {where} was written with {payload['threads']} thread(s) per process, "
              f"this run has {torch.get_num_threads()}: the continuation may differ from an "
              "uninterrupted run in the last bits (set OMP_NUM_THREADS to match)", file=sys.stderr)
    return {"step": payload["step"], "epoch": payload["epoch"],
            "batch_in_epoch": payload["batch_in_epoch"],
            "skipped_steps": int(payload.get("skipped_steps", 0)), "resumed": True}


def _shared_checkpoint(out: Path, world: WorldInfo, mode: str) -> dict | None:
    """Rank 0 reads and validates DIR/checkpoint.pt (when `mode` asks for it) and hands it to
    every rank; None for a fresh start. An unusable checkpoint is an InputError on all ranks."""
    answer: tuple[str, object] = ("fresh", None)
    if world.rank == 0:
        try:
            if out.is_dir():
                remove_stale_temporaries(out)
            if mode == "always" or (mode == "auto" and checkpoint_exists(out)):
                answer = ("ok", load_checkpoint(out, world_size=world.world_size))
        except InputError as exc:
            answer = ("error", str(exc))
    status, value = broadcast_object(answer, world)
    if status == "error":
        raise InputError(value)
    return value


def _check_trajectory(saved: dict, mine: dict, where: str) -> None:
    """InputError unless the checkpoint was written by a run this one can continue exactly."""
    for key in TRAJECTORY_KEYS:
        if saved.get(key) != mine[key]:
            raise InputError(f"{where}: field fingerprint/{key}: the checkpoint was written with "
                             f"{_short(saved.get(key))}, this run has {_short(mine[key])} "
                             "(resume with the same placement, model, seed and hyper-parameters)")


def _restore(payload: dict, world: WorldInfo, model, optimizer, precond, where: str) -> None:
    """Load the checkpoint's state into this rank's objects; a misfit is an InputError."""
    mine = payload["ranks"][world.rank]
    steps = [("model", lambda: model.load_state_dict(payload["model"])),
             ("optimizer", lambda: optimizer.load_state_dict(payload["optimizer"])),
             (f"ranks/{world.rank}/rng", lambda: set_rng_state(mine["rng"]))]
    if precond is not None:
        steps.append((f"ranks/{world.rank}/preconditioner",
                      lambda: precond.load_state_dict(mine["preconditioner"]
                                                      or {"steps": 0, "blocks": {}})))
    for field, load in steps:
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise InputError(f"{where}: field {field}: does not fit this run: {detail}") from None


def _agree(world: WorldInfo, action) -> None:
    """Run `action` on every rank; if it raised InputError on any rank, raise the first such
    error on all of them (so no rank trains on while another has given up)."""
    error = None
    try:
        action()
    except InputError as exc:
        error = str(exc)
    errors = [e for e in _all_gather_object(error, world) if e is not None]
    if errors:
        raise InputError(errors[0])


def _truncate_metrics(path: Path, *, before_step: int) -> None:
    """Keep only the metrics lines of steps before `before_step` (a killed run may have logged
    steps after its last checkpoint, or half a line); rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] < before_step:
            kept.append(line + "\n")
    write_atomic(path, lambda fh: fh.writelines(kept))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device) -> float:
    """Top-1 accuracy on the whole test set."""
    model.eval()
    correct = total = 0
    for x, y in test_loader(dataset):
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    model.train()
    return correct / total


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of all parameters' bytes, to compare ranks bit for bit."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _summarise(cfg, world, model, precond, records, steps, grad_bytes, split, skipped) -> dict:
    steady = records[cfg.warmup_steps:] or records
    memory = precond.memory_usage() if precond is not None else 0
    kinds = precond.comm_bytes_per_step() if precond is not None else {}
    layer_events = {n: dict(c) for n, c in precond.layer_numerics.items()} if precond else {}
    phases = {k: statistics.fmean(r[k] for r in steady) for k in steady[0]
              if k.endswith("_s")} if steady else {}
    per_rank = _all_gather_object({"memory": memory, "digest": parameter_digest(model),
                                   "comm": kinds, "numerics": layer_events,
                                   "phases": phases}, world)
    allreduce = ring_allreduce_bytes(grad_bytes, world.world_size)
    mine = per_rank[world.rank]
    totals = dict(_numerics(None, skipped))
    for rank_events in per_rank:  # every owner's own counts: exact for every strategy
        for counts in rank_events["numerics"].values():
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + int(value)
    losses = [r["loss"] for r in records if r["loss"] is not None]
    return {
        "world_size": world.world_size, "algorithm": cfg.algorithm,
        "variant": variant_of(cfg, world.world_size), "steps": steps,
        "final_loss": losses[-1] if losses else None,
        "numerics": totals,
        "numerics_per_layer": {n: c for r in per_rank for n, c in r["numerics"].items() if c},
        "test_accuracy": evaluate(model, split.test, world.device),
        "mean_step_time_s": statistics.fmean(r["step_time_s"] for r in steady) if steady else None,
        "steady_state": f"mean over steps after the first {cfg.warmup_steps} of this run",
        "phase_means_s": phases,
        "phase_means_by_rank_s": [r["phases"] for r in per_rank],
        "dataset": split.name,
        "staggered_decompositions": bool(precond is not None and precond.stagger_decompositions),
        "comm_bytes_per_step": comm_breakdown(allreduce, mine["comm"]),
        "second_order_memory_bytes": [r["memory"] for r in per_rank],
        "parameter_sha256": [r["digest"] for r in per_rank],
        "parameters_identical": len({r["digest"] for r in per_rank}) == 1,
    }


def comm_breakdown(allreduce: int, kinds: dict[str, float]) -> dict[str, float]:
    """Bytes this rank sent + received per step by collective kind: 'gradient_allreduce' (and
    its old name 'allreduce'), the preconditioner's COMM_KINDS, 'broadcast' (every broadcast
    byte, counters included) and 'total'. Whole numbers stay ints."""
    tidy = lambda v: int(v) if float(v).is_integer() else v  # noqa: E731
    out = {"allreduce": allreduce, "gradient_allreduce": allreduce}
    out.update({kind: tidy(kinds.get(kind, 0)) for kind in (*COMM_KINDS, "broadcast")})
    out["total"] = tidy(allreduce + kinds.get("factor_allreduce", 0) + kinds.get("broadcast", 0))
    return out


def _all_gather_object(obj: object, world: WorldInfo) -> list:
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
