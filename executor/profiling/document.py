"""`dpkfac profile`: the profile document (dpkfac.profile/1) of a model on this machine.

Per layer it times the preconditioner's own per-layer phase methods on real batches, after
warm-up, as medians of repeats (kernels); under torchrun with more than one process it also times
broadcast and all-reduce over message sizes and fits alpha-beta lines (collectives).
"""
from __future__ import annotations

import platform
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dpkfac.core.schemas import PROFILE_SCHEMA_ID

from ..kfac import require_kfac_layers, uncovered_layers
from ..models import build_model
from ..runtime.cpu_runtime import flushed_denormals, keep_freed_memory
from ..runtime.distributed import WorldInfo, broadcast_object
from .collectives import message_sizes, profile_comm
from .kernels import (
    accumulate_factors,
    layer_record,
    one_rank_preconditioner,
    profile_batches,
    step_record,
    time_steps,
)
from .options import ProfileOptions


def profile_model(model_name: str, batch_size: int, world: WorldInfo, *,
                  options: ProfileOptions = ProfileOptions(), progress: bool = False) -> dict:
    """Measure `model_name` at `batch_size` per worker; the profile document (dpkfac.profile/1).

    After folding `factor_batches` batches into the factors (so decompositions see full-rank
    factors, as in training), rank 0 alone (the others wait) runs warm-up + repeats
    training-like steps (kernels.time_steps); medians over the repeats. Then every rank times
    the collectives.
    """
    malloc = keep_freed_memory() if options.keep_freed_memory else {}
    with flushed_denormals(options.flush_denormal) as flushing:
        doc = _profile_model(model_name, batch_size, world, options, progress, flushing)
    doc["environment"]["malloc"] = malloc
    return doc


def _profile_model(model_name: str, batch_size: int, world: WorldInfo, options: ProfileOptions,
                   progress: bool, flushing: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name).to(world.device)
    require_kfac_layers(model, what=f"model {model_name!r}")
    batches = profile_batches(model_name, batch_size, options.factor_batches, world.device)
    precond = one_rank_preconditioner(model, options)
    rows = accumulate_factors(model, precond, batches)
    with _progress_bar(progress, options.warmup + options.repeats + 1) as bar:
        samples = _on_rank_zero_alone(world, lambda: time_steps(
            model, precond, batches, options, advance=lambda: _advance(bar, "steps")))
        precond.remove_hooks()
        layers = [layer_record(block, samples[name], rows[name])
                  for name, block in precond.blocks.items()]
        step = step_record(samples["step"])
        grad_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        x, y = batches[0]
        kfac_bytes = 4 * sum(block.grad_numel for block in precond.blocks.values())
        comm = profile_comm(world, options, message_sizes(4 * grad_numel),
                            before=lambda: F.cross_entropy(model(x), y).backward(),
                            owner_bytes=kfac_bytes // world.world_size)
        _advance(bar, "collectives")
    return {
        "schema": PROFILE_SCHEMA_ID, "model": model_name, "batch_size": batch_size,
        "device": _device_name(world.device), "dtype": "float32",
        "compute_method": precond.method.value, "measured": True, "layers": layers,
        "step": step, "comm": comm, "model_grad_numel": grad_numel,
        "other_layers": uncovered_layers(model),
        "environment": dict(_environment(world, options), flush_denormal=flushing),
    }


def _on_rank_zero_alone(world: WorldInfo, measure):
    """`measure()` run on rank 0 while the other ranks wait at a barrier; its result on every
    rank. Kernels are timed uncontended, as an owner meets them in training (the others wait in
    the broadcast): on a host with fewer cores than ranks, timing all ranks at once would
    charge every kernel for the other ranks' work."""
    if world.world_size == 1:
        return measure()
    result = measure() if world.rank == 0 else None
    dist.barrier()
    return broadcast_object(result, world)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _environment(world: WorldInfo, options: ProfileOptions) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "world_size": world.world_size,
            "timing": {"warmup": options.warmup, "repeats": options.repeats,
                       "statistic": "median", "spread": "interquartile range"}}


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
