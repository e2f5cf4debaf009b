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

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dpkfac.core.jsonio import write_atomic, write_json_atomic
from dpkfac.core.placement import check_placement_matches, load_placement
from dpkfac.core.step import SECOND_ORDER_PHASES

from ..kfac import kfac_layers
from ..preconditioner import KFACPreconditioner
from ..runtime.cpu_runtime import flushed_denormals, keep_freed_memory
from ..runtime.buckets import GradientBuckets
from ..runtime.distributed import (
    WorldInfo,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)
from ..runtime.faults import RunFault, RunPosition, fault_message
from ..runtime.timing import synchronize_device
from ..workload import Workload, prepare_workload
from ..workload.loaders import train_loader
from ..workload.loss import cross_entropy
from .config import (
    TrainConfig,
    batch_size,
    check_config,
    check_world,
    resume_mode,
    run_data_entry,
    run_strategy,
)
from .fingerprint import agree_on_fingerprint, run_fingerprint
from .metrics import MetricsLog, advance, progress_bar, truncate_metrics
from .precision import Precision
from .resume import save_run, start_state
from .schedule import LRSchedule, set_learning_rate
from .summary import job_numerics, summarise

# Phases in which a RuntimeError means a collective failed (not a bug in local computation).
MODEL_NAME = "model.pt"  # the final weights, always written by rank 0
COLLECTIVE_PHASES = ("start-up", "resume", "allreduce", "second_order/broadcast", "checkpoint",
                     "summary")


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
    check_config(cfg)
    placement = load_placement(cfg.placement)
    model_name = cfg.model or placement["model"]
    torch.manual_seed(cfg.seed)  # before the model is built: the same initial weights everywhere
    work = prepare_workload(model_name, run_data_entry(cfg, placement, model_name),
                            cfg.loss or placement.get("loss"))  # bad input: before the group
    layer_names = [n for n, _ in kfac_layers(work.model)]
    check_placement_matches(placement, layer_names=layer_names,
                            world_size=None, source=f"placement {cfg.placement!r}")
    world = init_distributed(timeout_s=cfg.timeout_s)
    position = RunPosition()
    broken = False  # a failed collective leaves the process group unusable
    try:
        check_world(placement, world, cfg)
        fingerprint = run_fingerprint(cfg, placement, work.record(), layer_names, world)
        agree_on_fingerprint(fingerprint, world)
        malloc = keep_freed_memory() if cfg.keep_freed_memory else {}
        with flushed_denormals(cfg.flush_denormal) as flushing:
            return _train(cfg, placement, work, world, position, fingerprint,
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


def _is_collective_failure(exc: RuntimeError, position: RunPosition) -> bool:
    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(exc, dist_error)) or \
        position.phase in COLLECTIVE_PHASES


def _train(cfg: TrainConfig, placement: dict, work: Workload, world: WorldInfo,
           position: RunPosition, fingerprint: dict, cpu_runtime: dict) -> dict:
    model = work.model.to(world.device)
    broadcast_parameters(model, world)
    split = work.split
    loader, sampler = train_loader(split.train, batch_size=batch_size(cfg, placement),
                                   rank=world.rank, world_size=world.world_size, seed=cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    precision = Precision.of(cfg.autocast, world.device)
    precond = None
    strategy = run_strategy(cfg, world.world_size)
    if strategy is not None:
        precond = KFACPreconditioner(model, placement, strategy=strategy,
                                     lr=lambda: optimizer.param_groups[0]["lr"],
                                     damping=cfg.damping, factor_decay=cfg.factor_decay,
                                     kl_clip=cfg.kl_clip, precise_timing=cfg.precise_timing,
                                     stagger_decompositions=cfg.stagger_decompositions,
                                     grad_scaler=precision.scaler, overlap=cfg.overlap)
    per_epoch = len(loader) // cfg.accumulate  # optimizer steps per epoch
    schedule = LRSchedule.of(cfg.lr_schedule, per_epoch * cfg.epochs, cfg.lr_warmup_steps)
    fingerprint = {**fingerprint, "lr_schedule": schedule.record()}
    out = Path(cfg.out_dir)
    position.at("resume")
    start = start_state(resume_mode(cfg), cfg.checkpoint_every, out, world, model, optimizer,
                        precond, fingerprint, scaler=precision.scaler)
    out.mkdir(parents=True, exist_ok=True)
    usable = per_epoch * cfg.accumulate        # loader batches those steps consume
    total_steps = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    resumed = start["step"] > 0 or start["resumed"]
    if resumed and world.rank == 0:
        truncate_metrics(out / "metrics.jsonl", before_step=start["step"])
    log = MetricsLog(out / "metrics.jsonl", enabled=world.rank == 0, append=resumed)
    step_run = StepRun(model, optimizer, precond, world, StepClock(cfg.precise_timing),
                       position, work.loss_fn, precision, overlap=cfg.overlap)
    step, grad_bytes, skipped = start["step"], 0, start["skipped_steps"]
    here = (start["epoch"], start["batch_in_epoch"])  # where the next step's batch is
    records: list[dict] = []
    with progress_bar(cfg.progress, world, total_steps, start["step"]) as bar:
        for epoch in range(start["epoch"], cfg.epochs):
            sampler.set_epoch(epoch)
            skip = start["batch_in_epoch"] if epoch == start["epoch"] else 0
            micro: list[tuple[torch.Tensor, torch.Tensor]] = []
            for batch_index, (x, y) in enumerate(loader):
                if batch_index < skip:
                    continue
                if step >= total_steps or batch_index >= usable:
                    break
                micro.append((x.to(world.device), y.to(world.device)))
                if len(micro) < cfg.accumulate:
                    continue
                position.at("forward_backward", step)
                lr = set_learning_rate(optimizer, cfg.lr, schedule, step)
                record, grad_bytes = step_run(micro)
                micro = []
                skipped += int(record["skipped"])
                record.update(step=step, epoch=epoch, lr=lr,
                              numerics=job_numerics(precond, skipped))
                records.append(record)
                log.write(record)
                step += 1
                here = _next_position(epoch, batch_index, usable)
                advance(bar, record["loss"])
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    position.at("checkpoint")
                    save_run(out, world, model, optimizer, precond, step, here, fingerprint,
                             skipped, scaler=precision.scaler)
            if step >= total_steps:
                break
    log.close()
    position.at("checkpoint")
    if cfg.checkpoint_every or resumed:
        save_run(out, world, model, optimizer, precond, step, here, fingerprint, skipped,
                 scaler=precision.scaler)
    position.at("summary")
    summary = summarise(cfg, world, model, precond, records, step, grad_bytes, split, skipped,
                        loss_fn=work.loss_fn)
    summary.update(cpu_runtime=cpu_runtime, lr_schedule=schedule.record(), loss=work.loss,
                   accumulate=cfg.accumulate, autocast=cfg.autocast)
    if world.rank == 0:
        save_model(out / MODEL_NAME, model)
        write_json_atomic(out / "summary.json", summary)
    return summary


def save_model(path: Path, model: nn.Module) -> None:
    """The model's state_dict (unwrapped from DDP), written atomically: loadable with
    torch.load(weights_only=True) and load_state_dict(strict=True) into the same model."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    write_atomic(path, lambda fh: torch.save(state, fh), binary=True)


class StepRun:
    """One training step at a time: the K micro-batches' forwards (under autocast when asked)
    and backwards, the gradient all-reduce in buckets (runtime.buckets), the preconditioner,
    the optimizer.

    With `overlap` (the default) the buckets go out from the last backward as they fill and
    the preconditioner's local phases (prepare(); DP-KFAC: an owner's factors and
    decompositions, from its own batch) run while they are in flight, the rest once they are
    done. Without it every bucket is posted after backward and waited for, then the whole
    preconditioner step runs. Both send the same buffers in the same order: the same numbers,
    to the bit."""

    def __init__(self, model, optimizer, precond, world: WorldInfo, clock: StepClock,
                 position: RunPosition, loss_fn=cross_entropy,
                 precision: Precision = Precision(), *, overlap: bool = True) -> None:
        self.model, self.optimizer, self.precond = model, optimizer, precond
        self.world, self.clock, self.position = world, clock, position
        self.loss_fn, self.precision, self.overlap = loss_fn, precision, overlap
        self.buckets = GradientBuckets(model, world.world_size)

    def __call__(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, int]:
        """One step over `micro` (this rank's micro-batches, each loss divided by their count);
        returns its metrics record and the gradient all-reduce buffer bytes.

        A step whose averaged loss or gradients hold NaN/inf is skipped: no preconditioner or
        optimizer step, captured activations dropped (a loss scaler still lowers its scale).
        The averaged buffer is bit-identical on every rank, so every rank skips the same steps.
        """
        model, optimizer, precond, scaler = self.model, self.optimizer, self.precond, \
            self.precision.scaler
        t0 = self.clock.mark()
        optimizer.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), device=self.world.device)
        for i, (x, y) in enumerate(micro):
            with self.precision.autocast():
                loss = self.loss_fn(model(x), y)
            loss_sum += loss.detach().float()
            if self.overlap and i == len(micro) - 1:
                loss_buf = (loss_sum / len(micro)).reshape(1)
                self.buckets.arm(loss_buf)  # buckets go out from this backward as they fill
            scaled = loss / len(micro)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if not self.overlap:
            loss_buf = (loss_sum / len(micro)).reshape(1)
            self.buckets.arm(loss_buf)
        t1 = self.clock.mark()
        self.position.at("allreduce")
        self.buckets.post_remaining()
        prepared, prepared_s = self._prepare()
        self.position.at("allreduce")
        grad_bytes, finite = self.buckets.wait()
        if scaler is not None:
            scaler.unscale_(optimizer)  # records inf/NaN for scaler.update()
        t2 = self.clock.mark()
        self.position.at("second_order")
        if precond is not None and finite:
            try:
                precond.finish() if prepared else precond.step()
            finally:
                self.position.at(f"second_order/{precond.current_phase or 'apply'}")
        elif precond is not None:
            precond.rollback()
        t3 = self.clock.mark()
        self.position.at("optimizer")
        if finite:
            optimizer.step()
        if scaler is not None:
            scaler.update()
        t4 = self.clock.mark()
        ran = precond is not None and finite
        phases = precond.phase_times if ran else dict.fromkeys(SECOND_ORDER_PHASES, 0.0)
        record = {"loss": float(loss_buf) if finite else None, "skipped": not finite,
                  "step_time_s": t4 - t0, "forward_backward_s": t1 - t0,
                  "allreduce_s": t2 - t1 - prepared_s, "second_order_s": t3 - t2 + prepared_s,
                  "optimizer_s": t4 - t3,
                  **{f"{k}_s": v for k, v in phases.items()}}
        return record, grad_bytes

    def _prepare(self) -> tuple[bool, float]:
        """The preconditioner's local phases while the all-reduce is in flight (none without
        overlap); whether they ran, and their seconds."""
        if self.precond is None:
            return False, 0.0
        start = self.clock.mark()
        self.position.at("second_order")
        try:
            prepared = self.precond.prepare()
        finally:
            self.position.at(f"second_order/{self.precond.current_phase or 'prepare'}")
        return prepared, self.clock.mark() - start


def train_step(model, optimizer, precond, x, y, world: WorldInfo, clock: StepClock,
               position: RunPosition):
    """One step on one batch with cross-entropy (StepRun without accumulation or autocast)."""
    run = StepRun(model, optimizer, precond, world, clock, position)
    try:
        return run([(x, y)])
    finally:
        run.buckets.remove()


def _next_position(epoch: int, batch_index: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batch index) of the batch after `batch_index` of `epoch`."""
    if batch_index + 1 >= per_epoch:
        return epoch + 1, 0
    return epoch, batch_index + 1
