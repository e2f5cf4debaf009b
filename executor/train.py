"""`dpkfac train`: data-parallel training under a fixed placement, one process per worker."""
from __future__ import annotations

import hashlib
import json
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

from planner.errors import InputError
from planner.jsonio import write_json_atomic
from planner.placement import check_placement_matches, load_placement

from .blocks import kfac_layers
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import load_digits_split, test_loader, train_loader
from .distributed import (WorldInfo, allreduce_mean_, init_distributed, ring_allreduce_bytes,
                          shutdown_distributed)
from .models import build_model
from .preconditioner import PHASES, DPKFAC
from .timing import synchronize_device

ALGORITHMS = ("dp-kfac", "mpd-kfac", "kaisa", "sgd")
IMPLEMENTED = ("dp-kfac", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told. Learning rates are per step; times in seconds."""
    placement: str
    out_dir: str
    epochs: int = 10
    max_steps: int | None = None
    seed: int = 0
    algorithm: str = "dp-kfac"
    model: str | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float = 0.003
    kl_clip: float = 0.001
    factor_decay: float = 0.95
    checkpoint_every: int | None = None
    resume: bool = False
    warmup_steps: int = 5
    precise_timing: bool = False
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
    """Train; return the summary (rank 0 also writes it with metrics and checkpoints)."""
    _check_config(cfg)
    placement = load_placement(cfg.placement)
    model_name = cfg.model or placement["model"]
    model = build_model(model_name)
    check_placement_matches(placement, layer_names=[n for n, _ in kfac_layers(model)],
                            world_size=None, source=f"placement {cfg.placement!r}")
    world = init_distributed()
    try:
        _check_world(placement, world, cfg)
        return _train(cfg, placement, model_name, model, world)
    finally:
        shutdown_distributed()


def _check_config(cfg: TrainConfig) -> None:
    if cfg.algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {cfg.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if cfg.algorithm not in IMPLEMENTED:
        raise InputError(f"algorithm {cfg.algorithm!r} is not implemented yet; use dp-kfac or sgd")
    for flag, value in (("--epochs", cfg.epochs), ("--max-steps", cfg.max_steps),
                        ("--checkpoint-every", cfg.checkpoint_every),
                        ("--batch-size", cfg.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {cfg.out_dir!r} exists and is not a folder")
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        raise InputError(f"--resume: checkpoint {str(out / 'checkpoint.pt')!r} does not exist")


def _check_world(placement: dict, world: WorldInfo, cfg: TrainConfig) -> None:
    if placement["world_size"] != world.world_size:
        raise InputError(f"placement {cfg.placement!r}: field world_size: placement is for "
                         f"{placement['world_size']} workers, this run has {world.world_size} "
                         "process(es) (launch with torchrun --nproc_per_node "
                         f"{placement['world_size']})")


def _train(cfg: TrainConfig, placement: dict, model_name: str, model: nn.Module,
           world: WorldInfo) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_model(model_name).to(world.device)  # rebuilt after seeding: same init everywhere
    _broadcast_parameters(model, world)
    batch_size = cfg.batch_size or placement["config"].get("batch_size", 32)
    split = load_digits_split()
    loader, sampler = train_loader(split.train, batch_size=batch_size, rank=world.rank,
                                   world_size=world.world_size, seed=cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    precond = None
    if cfg.algorithm == "dp-kfac":
        precond = DPKFAC(model, placement, lr=lambda: optimizer.param_groups[0]["lr"],
                         damping=cfg.damping, factor_decay=cfg.factor_decay, kl_clip=cfg.kl_clip,
                         precise_timing=cfg.precise_timing)
    out = Path(cfg.out_dir)
    start = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if cfg.resume:
        start = _restore(out, world, model, optimizer, precond)
    out.mkdir(parents=True, exist_ok=True)
    total_steps = len(loader) * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    log = MetricsLog(out / "metrics.jsonl", enabled=world.rank == 0, append=cfg.resume)
    clock = StepClock(cfg.precise_timing)
    step, grad_bytes = start["step"], 0
    position = (start["epoch"], start["batch_in_epoch"])  # where the next step's batch is
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
                record, grad_bytes = _train_step(model, optimizer, precond, x.to(world.device),
                                                 y.to(world.device), world, clock)
                record.update(step=step, epoch=epoch)
                records.append(record)
                log.write(record)
                step += 1
                position = _next_position(epoch, batch_index, len(loader))
                if bar is not None:
                    bar.update(bar.task_ids[0], advance=1, description=f"loss {record['loss']:.3f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    _checkpoint(out, world, model, optimizer, precond, step, position)
            if step >= total_steps:
                break
    log.close()
    if cfg.checkpoint_every or cfg.resume:
        _checkpoint(out, world, model, optimizer, precond, step, position)
    summary = _summarise(cfg, world, model, precond, records, step, grad_bytes, split)
    if world.rank == 0:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _train_step(model, optimizer, precond, x, y, world: WorldInfo, clock: StepClock):
    """One step; returns its metrics record and the gradient all-reduce buffer bytes."""
    t0 = clock.mark()
    optimizer.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    t1 = clock.mark()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    loss_buf = loss.detach().reshape(1).clone()
    grad_bytes = allreduce_mean_(grads + [loss_buf], world.world_size)
    t2 = clock.mark()
    if precond is not None:
        precond.step()
    t3 = clock.mark()
    optimizer.step()
    t4 = clock.mark()
    phases = precond.phase_times if precond is not None else dict.fromkeys(PHASES, 0.0)
    record = {"loss": float(loss_buf), "step_time_s": t4 - t0, "forward_backward_s": t1 - t0,
              "allreduce_s": t2 - t1, "second_order_s": t3 - t2, "optimizer_s": t4 - t3,
              **{f"{k}_s": v for k, v in phases.items()}}
    return record, grad_bytes


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


def _checkpoint(out, world, model, optimizer, precond, step: int, position: tuple[int, int]):
    common = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
              "epoch": position[0], "batch_in_epoch": position[1]}
    per_rank = {"preconditioner": precond.state_dict() if precond is not None else None,
                "rng": rng_state()}
    save_checkpoint(out, rank=world.rank, world_size=world.world_size, common=common,
                    per_rank=per_rank)


def _restore(out, world, model, optimizer, precond) -> dict:
    payload = load_checkpoint(out, world_size=world.world_size)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    mine = payload["ranks"][world.rank]
    if precond is not None and mine["preconditioner"] is not None:
        precond.load_state_dict(mine["preconditioner"])
    set_rng_state(mine["rng"])
    return {k: payload[k] for k in ("step", "epoch", "batch_in_epoch")}


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


def _summarise(cfg, world, model, precond, records, steps, grad_bytes, split) -> dict:
    steady = records[cfg.warmup_steps:] or records
    memory = precond.memory_usage() if precond is not None else 0
    bcast = (precond.comm_bytes["broadcast"] / max(precond.steps, 1)) if precond is not None else 0
    per_rank = _all_gather_object({"memory": memory, "digest": parameter_digest(model),
                                   "broadcast": bcast}, world)
    allreduce = ring_allreduce_bytes(grad_bytes, world.world_size)
    mine = per_rank[world.rank]
    return {
        "world_size": world.world_size, "algorithm": cfg.algorithm, "steps": steps,
        "final_loss": records[-1]["loss"] if records else None,
        "test_accuracy": evaluate(model, split.test, world.device),
        "mean_step_time_s": statistics.fmean(r["step_time_s"] for r in steady) if steady else None,
        "steady_state": f"mean over steps after the first {cfg.warmup_steps} of this run",
        "phase_means_s": {k: statistics.fmean(r[k] for r in steady) for k in steady[0]
                          if k.endswith("_s")} if steady else {},
        "comm_bytes_per_step": {"allreduce": allreduce, "broadcast": int(mine["broadcast"]),
                                "total": allreduce + int(mine["broadcast"])},
        "second_order_memory_bytes": [r["memory"] for r in per_rank],
        "parameter_sha256": [r["digest"] for r in per_rank],
        "parameters_identical": len({r["digest"] for r in per_rank}) == 1,
    }


def _all_gather_object(obj: object, world: WorldInfo) -> list:
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
