"""The profile document (dpkfac.profile/1) of a model on this machine, for `dpkfac profile` and
dpkfac.profile.

Per layer it times the preconditioner's own per-layer phase methods on real batches, after
warm-up, as trimmed means of repeats (kernels); under torchrun with more than one process it
also times broadcast and all-reduce over message sizes and fits alpha-beta lines (collectives).
"""
from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dpkfac.core.schemas import PROFILE_SCHEMA_ID

from ..kfac import require_kfac_layers, uncovered_layers
from ..runtime.buckets import model_bucket_bytes
from ..runtime.cpu_runtime import flushed_denormals, keep_freed_memory
from ..runtime.distributed import WorldInfo, all_gather_object, broadcast_object
from ..workload.loaders import Batches
from ..workload.loss import LossFn
from .collectives import message_sizes, profile_comm
from .kernels import (
    StepSamples,
    StepTimer,
    accumulate_factors,
    contention_slowdown,
    kfac_numel,
    layer_record,
    one_rank_preconditioner,
    step_record,
    timed_steps,
)
from .options import ProfileOptions
from .robust import TRIM


def profile_module(model: nn.Module, batches: Batches, world: WorldInfo, *, loss_fn: LossFn,
                   workload: dict, options: ProfileOptions = ProfileOptions(),
                   progress: bool = False) -> dict:
    """Measure `model` (on world.device) on `batches` (per-worker batches of (input, target));
    the profile document (dpkfac.profile/1), the same on every rank. `workload` holds the
    entries that say what was measured: "model" (its name), "data" (the data entry) and "loss".

    After folding the batches into the factors (so decompositions see full-rank factors, as in
    training), every rank at once runs warm-up + repeats training-like steps
    (kernels.StepTimer: the step's traffic flows as in the overlapped step), each step
    started together; trimmed means (robust.TRIM) over every rank's repeats. Between them
    rank 0 times each step again alone, the others only in its traffic (the profile's
    contention: busy over alone, at the same moments). Every rank also times the
    collectives, each call after one forward/backward; the timed steps are spread over the
    collectives' trials (one after each trial), so a shared host's slow seconds meet a few of
    them, which the trimming drops, instead of all. Forward/backward's level is
    that of the trials' hundreds (kernels.step_record), not the steps' few.
    """
    malloc = keep_freed_memory() if options.keep_freed_memory else {}
    with flushed_denormals(options.flush_denormal) as flushing:
        doc = _profile(model, batches, world, loss_fn, options, progress)
    doc.update(model=workload["model"], data=workload["data"], loss=workload["loss"])
    doc["environment"].update(malloc=malloc, flush_denormal=flushing)
    return broadcast_object(doc, world)


def _profile(model: nn.Module, batches: Batches, world: WorldInfo, loss_fn: LossFn,
             options: ProfileOptions, progress: bool) -> dict:
    require_kfac_layers(model, what="the model")
    precond = one_rank_preconditioner(model, options)
    timer = None
    try:
        rows = accumulate_factors(model, precond, batches, loss_fn)
        total = options.warmup + timed_steps(options, world.world_size) + 1
        with _progress_bar(progress, total) as bar:
            timer = StepTimer(model, precond, batches, loss_fn, options,
                              align=dist.barrier if world.world_size > 1 else lambda: None,
                              world_size=world.world_size,
                              alone=world.rank == 0 if world.world_size > 1 else None)
            step = _stepper(timer, lambda: _advance(bar, "steps"))
            for _ in range(options.warmup):
                step()
            x, y = batches[0]
            bucket_bytes = tuple(model_bucket_bytes(model))
            comm = profile_comm(world, options,
                                _step_message_sizes(model, precond, world, bucket_bytes),
                                before=lambda: _forward_backward(model, precond, loss_fn, x, y),
                                between=lambda trial: step(),
                                owner_bytes=4 * kfac_numel(precond) // world.world_size,
                                gradient_bytes=4 * (_grad_numel(model) + 1),
                                bucket_bytes=bucket_bytes)
            while timer.left:
                step()
            _advance(bar, "collectives")
        samples = _pooled(all_gather_object(timer.samples.busy, world))
        contention = _contention(world, timer.samples)
    finally:
        precond.remove_hooks()
        if timer is not None:
            timer.close()
    return {
        "schema": PROFILE_SCHEMA_ID, "batch_size": int(batches[0][0].shape[0]),
        "device": _device_name(world.device), "dtype": "float32",
        "compute_method": precond.method.value, "measured": True,
        "layers": [layer_record(block, samples[name], rows[name])
                   for name, block in precond.blocks.items()],
        "step": step_record(samples["step"], list(bucket_bytes), comm.before_s),
        "comm": comm.entry,
        "model_grad_numel": _grad_numel(model), "other_layers": uncovered_layers(model),
        "environment": _environment(world, options),
        **({"contention": contention} if contention else {}),
    }


def _stepper(timer: StepTimer, advance):
    """A callable running the timer's next step (nothing once all are run), then `advance()`."""
    def step():
        if timer.left:
            timer.step()
            advance()
    return step


def _forward_backward(model: nn.Module, precond, loss_fn: LossFn, x: torch.Tensor,
                      y: torch.Tensor) -> None:
    """One forward/backward of the batch (x, y), its captured activations dropped: the compute
    each collective trial follows."""
    loss_fn(model(x), y).backward()
    precond.capture.clear()


def _step_message_sizes(model: nn.Module, precond, world: WorldInfo,
                        bucket_bytes: tuple[int, ...]) -> tuple[int, ...]:
    """The sizes to time the collectives at, bytes: powers of 4 and what the step sends: the
    gradient all-reduce (gradients and the loss), each of its buckets (`bucket_bytes`), an
    owner's share of the preconditioned gradients, all factors (when they are all-reduced)."""
    factors = sum(b.dim_a ** 2 + b.dim_g ** 2 for b in precond.blocks.values())
    extra = (4 * (_grad_numel(model) + 1), 4 * kfac_numel(precond) // world.world_size,
             4 * factors, *bucket_bytes)
    return message_sizes(4 * _grad_numel(model), extra)


def _grad_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _pooled(per_rank: list[dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, list[float]]]:
    """Every rank's busy samples ({what: {kernel: [seconds, ...]}}) pooled. In training the
    ranks compute at the same time (every phase but the waits runs on all of them:
    forward/backward, each owner's layers), so kernels are timed beside one another, with
    whatever the ranks cost each other on a shared host (cores, memory bandwidth, caches)."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for samples in per_rank:
        for what, kernels in samples.items():
            for kernel, values in kernels.items():
                pooled.setdefault(what, {}).setdefault(kernel, []).extend(values)
    return pooled


def _contention(world: WorldInfo, measured: StepSamples) -> dict | None:
    """{"ranks", "slowdown"[, "cores"]} for the profile (None on one rank): rank 0's K-FAC
    kernels in the steps every rank computes over the same kernels in the steps between them
    where it computes alone (the others in the traffic only): what the ranks cost one another;
    and, when every rank computes on the CPUs of one host, how many cores it lets them use."""
    if world.world_size == 1:
        return None
    slowdown = contention_slowdown(measured.busy, measured.alone) if world.rank == 0 else None
    cores = _shared_host_cores(world)
    return {"ranks": world.world_size, "slowdown": broadcast_object(slowdown, world),
            **({"cores": cores} if cores is not None else {})}


def _shared_host_cores(world: WorldInfo) -> int | None:
    """The CPU cores the ranks may run on when all of them compute on the CPUs of one host
    (one kernel boot id, else one host name), else None (GPUs, or several hosts)."""
    try:
        host = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        host = platform.node()
    cpus = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else list(range(os.cpu_count() or 0)))
    return shared_cores(all_gather_object((host, cpus, world.device.type), world))


def shared_cores(seen: list[tuple[str, list[int], str]]) -> int | None:
    """Cores the ranks share, from each rank's (host, CPUs it may run on, device type): the
    CPUs any of them may use, when every rank computes on the CPUs of one host (ranks pinned
    to cores of their own count them all), else None."""
    if len({host for host, _, _ in seen}) > 1 or any(kind != "cpu" for _, _, kind in seen):
        return None
    cpus = set().union(*(set(c) for _, c, _ in seen))
    return len(cpus) or None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _environment(world: WorldInfo, options: ProfileOptions) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "world_size": world.world_size,
            "timing": {"warmup": options.warmup, "repeats": options.repeats,
                       "statistic": f"mean without the lowest and highest {TRIM:.0%}",
                       "spread": "interquartile range",
                       "ranks_timed_at_once": world.world_size,
                       "steps_spread": "one after each collective trial"}}


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("profile"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"))
    bar.add_task("", total=total)
    return bar


def _advance(bar, description: str) -> None:
    if bar is not None:
        bar.update(bar.task_ids[0], advance=1, description=description)
