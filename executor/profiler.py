"""`dpkfac profile`: time the executor's own K-FAC kernels per layer, and the collectives.

Per layer it times exactly the block methods DPKFAC calls (factor construction of A and G,
decomposition of A and G, preconditioning) on one real batch, after warm-up, as a median of
repeats. Under torchrun with more than one process it also times broadcast and all-reduce over
message sizes and fits alpha-beta (seconds, seconds per byte) by least squares.
"""
from __future__ import annotations

import platform
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dpkfac.core.schemas import PROFILE_SCHEMA_ID

from .alphabeta import fit_alpha_beta
from .blocks import ComputeMethod, KFACBlock, apply_preconditioned, kfac_layers, make_block
from .cpu_runtime import flushed_denormals, keep_freed_memory
from .data import load_digits_split
from .distributed import WorldInfo, average_gradients_
from .models import build_model, input_spec
from .timing import synchronize_device

# Collective costs assumed when profiling a single process (nothing to measure): loopback gloo.
ASSUMED_COMM = {"alpha_s": 5e-5, "beta_s_per_byte": 1e-9}
MIN_LARGEST_MESSAGE = 4 << 20   # bytes: always time at least up to 4 MiB
MAX_LARGEST_MESSAGE = 64 << 20  # bytes: and never beyond 64 MiB


def message_sizes(model_grad_bytes: int) -> tuple[int, ...]:
    """Collective message sizes to time, bytes: powers of 4 from 1 KiB up to the model's whole
    gradient (at least 4 MiB, at most 64 MiB)."""
    largest = min(max(model_grad_bytes, MIN_LARGEST_MESSAGE), MAX_LARGEST_MESSAGE)
    sizes, size = [], 1 << 10
    while size <= largest:
        sizes.append(size)
        size *= 4
    return tuple(sizes)


@dataclass(frozen=True)
class ProfileOptions:
    """How carefully to measure."""
    compute_method: str = "eigen"
    damping: float = 0.003
    warmup: int = 3
    repeats: int = 15
    factor_batches: int = 16  # distinct batches folded into the factors before timing
    factor_decay: float = 0.95
    flush_denormal: bool = True  # as `train` does by default (cpu_runtime)
    keep_freed_memory: bool = True  # as `train` does by default (cpu_runtime)


def profile_model(model_name: str, batch_size: int, world: WorldInfo, *,
                  options: ProfileOptions = ProfileOptions(), progress: bool = False) -> dict:
    """Measure `model_name` at `batch_size` per worker; the profile document (dpkfac.profile/1).

    After folding `factor_batches` batches into the factors (so decompositions see full-rank
    factors, as in training), rank 0 alone (the others wait) runs warm-up + repeats
    training-like steps: forward/backward with the capture hooks, the gradient packing of the all-reduce, every layer's factor
    updates, then every decomposition, then every preconditioning, the KL clip and write-back,
    and an optimizer step with learning rate 0 (weights stay put), in the executor's order, so
    each kernel is timed with the caches as training leaves them. Medians over the repeats.
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
    batches = _batches(model_name, batch_size, options.factor_batches, world.device)
    blocks, captured = _accumulate_factors(model, batches, options.factor_decay)
    method = ComputeMethod(options.compute_method)
    with _progress_bar(progress, options.warmup + options.repeats + 1) as bar:
        samples = _on_rank_zero_alone(world, lambda: _time_steps(
            model, blocks, batches, method, options, advance=lambda: _advance(bar, "steps")))
        layers = [_layer_record(block, samples[block.name], captured[block.name][1])
                  for block in blocks]
        step = _step_record(samples["step"])
        grad_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        x, y = batches[0]
        kfac_bytes = 4 * sum(block.grad_numel for block in blocks)
        comm = _profile_comm(world, options, message_sizes(grad_bytes),
                             before=lambda: F.cross_entropy(model(x), y).backward(),
                             owner_bytes=kfac_bytes // world.world_size)
        _advance(bar, "collectives")
    return {
        "schema": PROFILE_SCHEMA_ID, "model": model_name, "batch_size": batch_size,
        "device": _device_name(world.device), "dtype": "float32",
        "compute_method": method.value, "measured": True, "layers": layers, "step": step,
        "comm": comm,
        "model_grad_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "environment": dict(_environment(world, options), flush_denormal=flushing),
    }


def _on_rank_zero_alone(world: WorldInfo, measure):
    """`measure()` run on rank 0 while the other ranks wait at a barrier; its result on every
    rank. Kernels are timed uncontended, as an owner meets them in training (the others wait in
    the broadcast): on a host with fewer cores than ranks, timing all ranks at once would
    charge every kernel for the other ranks' work."""
    if world.world_size == 1:
        return measure()
    result = [measure() if world.rank == 0 else None]
    dist.barrier()
    dist.broadcast_object_list(result, src=0)
    return result[0]


def _batches(model_name: str, batch_size: int, count: int,
             device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` distinct batches: consecutive digits (wrapping around) for digits models, seeded
    random inputs of the model's input shape for the others."""
    spec = input_spec(model_name)
    if spec.dataset == "digits":
        train = load_digits_split().train
        indices = [(torch.arange(batch_size) + i * batch_size) % len(train) for i in range(count)]
        batches = [train[index] for index in indices]
    else:
        generator = torch.Generator().manual_seed(0)
        batches = [spec.random_batch(batch_size, generator=generator) for _ in range(count)]
    return [(x.to(device), y.to(device)) for x, y in batches]


def _capture_hooks(blocks: list[KFACBlock]):
    """Forward hooks that keep every layer's latest input and output gradient."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for block in blocks:
        def fwd(mod, args, out, name=block.name):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: outputs.__setitem__(name, g.detach()))
        hooks.append(block.module.register_forward_hook(fwd))
    return inputs, outputs, hooks


def _accumulate_factors(model: nn.Module, batches, decay: float):
    """Blocks of every K-FAC layer with running factors folded over `batches`, as in training
    (so decompositions are timed on realistic, full-rank factors), and the last batch's inputs,
    output gradients and dW per layer."""
    blocks = [make_block(m, n) for n, m in kfac_layers(model)]
    inputs, outputs, hooks = _capture_hooks(blocks)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for block in blocks:
            block.update_factor_a(inputs[block.name], decay)
            block.update_factor_g(outputs[block.name], decay)
    for hook in hooks:
        hook.remove()
    captured = {b.name: (inputs[b.name], outputs[b.name], b.grad_matrix().clone()) for b in blocks}
    return blocks, captured


LAYER_KERNELS = ("factor_a", "factor_g", "decompose_a", "decompose_g", "precondition")
STEP_PHASES = ("forward_backward", "pack", "apply", "optimizer")


def _time_steps(model: nn.Module, blocks: list[KFACBlock], batches, method,
                options: ProfileOptions, advance) -> dict[str, dict[str, list[float]]]:
    """Seconds of every kernel in each timed step: {layer name or "step": {kernel: [s, ...]}}.

    The per-layer kernels are the block methods DPKFAC.step runs for an owned layer: factor
    update of A, factor update of G with the non-finite check, each decomposition, and
    precondition_if_finite of the layer's gradient matrix.
    """
    samples = {b.name: {k: [] for k in LAYER_KERNELS} for b in blocks}
    samples["step"] = {k: [] for k in STEP_PHASES}
    inputs, outputs, hooks = _capture_hooks(blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    clock = _Clock()
    for i in range(options.warmup + options.repeats):
        keep = i >= options.warmup
        x, y = batches[i % len(batches)]
        with clock.time(samples["step"]["forward_backward"], keep):
            optimizer.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        with clock.time(samples["step"]["pack"], keep):
            average_gradients_(grads + [loss.detach().reshape(1).clone()], 1)
        for b in blocks:
            with clock.time(samples[b.name]["factor_a"], keep):
                b.update_factor_a(inputs[b.name], options.factor_decay)
            with clock.time(samples[b.name]["factor_g"], keep):
                b.update_factor_g(outputs[b.name], options.factor_decay)
                b.drop_nonfinite_factors()
        for b in blocks:
            with clock.time(samples[b.name]["decompose_a"], keep):
                b.decompose_a(method, options.damping)
            with clock.time(samples[b.name]["decompose_g"], keep):
                b.decompose_g(method, options.damping)
        results = {}
        for b in blocks:
            with clock.time(samples[b.name]["precondition"], keep):
                result = b.precondition_if_finite(b.grad_matrix(), method, options.damping)
            results[b.name] = b.grad_matrix() if result is None else result
        with clock.time(samples["step"]["apply"], keep):
            apply_preconditioned(blocks, results, lr=0.1, kl_clip=0.001)
        with clock.time(samples["step"]["optimizer"], keep):
            optimizer.step()
        advance()
    for hook in hooks:
        hook.remove()
    return samples


class _Clock:
    """Times a block into a list of seconds (device-synchronised), when asked to keep it."""

    @contextmanager
    def time(self, into: list[float], keep: bool):
        synchronize_device()
        start = time.perf_counter()
        yield
        synchronize_device()
        if keep:
            into.append(time.perf_counter() - start)


def _median_and_spread(values: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), quartiles[2] - quartiles[0]


def _layer_record(block: KFACBlock, samples: dict[str, list[float]], grad_output) -> dict:
    stats = {k: _median_and_spread(v) for k, v in samples.items()}
    record = {"name": block.name, "kind": type(block.module).__name__,
              "dim_a": block.dim_a, "dim_g": block.dim_g, "grad_numel": block.grad_numel}
    record.update({f"{k}_s": stats[k][0] for k in LAYER_KERNELS})
    record.update(state_bytes=block.memory_usage(), rows_a=_rows(block, grad_output),
                  rows_g=_rows(block, grad_output),
                  spread_iqr_s={k: stats[k][1] for k in LAYER_KERNELS})
    return record


def _step_record(samples: dict[str, list[float]]) -> dict:
    stats = {k: _median_and_spread(v) for k, v in samples.items()}
    return {**{f"{k}_s": stats[k][0] for k in STEP_PHASES},
            "spread_iqr_s": {k: stats[k][1] for k in STEP_PHASES}}


def _rows(block: KFACBlock, grad_output: torch.Tensor) -> int:
    """Rows of the matrices both factors are built from: batch x output positions for a conv
    (one unfolded patch per position), all leading dimensions for a Linear."""
    if isinstance(block.module, nn.Conv2d):
        return int(grad_output.numel() // grad_output.shape[1])
    return int(grad_output.numel() // grad_output.shape[-1])


def _profile_comm(world: WorldInfo, options: ProfileOptions, sizes: tuple[int, ...],
                  before=lambda: None, owner_bytes: int = 1 << 10) -> dict:
    backend = world.backend or ("nccl" if world.device.type == "cuda" else "gloo")
    if world.world_size == 1:
        return {"backend": backend, "world_size": 1, "allreduce": dict(ASSUMED_COMM),
                "broadcast": dict(ASSUMED_COMM), "source": "assumed (single process: nothing to "
                                                           "measure; run under torchrun to fit)"}
    kinds = ("allreduce", "broadcast")
    shared = torch.zeros(max(max(sizes) // 4, 1), dtype=torch.float32, device=world.device)
    means = _time_collectives([_collective(kind, shared[:max(n // 4, 1)]) for kind in kinds
                               for n in sizes], world, options, before)
    fits = {}
    for k, kind in enumerate(kinds):
        seconds = means[k * len(sizes):(k + 1) * len(sizes)]
        fits[kind] = dict(fit_alpha_beta(sizes, seconds), seconds=seconds)
    return {"backend": backend, "world_size": world.world_size, **fits, "source": "measured",
            "statistic": "mean over trials of the slowest rank's time",
            "message_bytes": list(sizes),
            **_broadcast_overlap(world, options, max(owner_bytes, 1 << 10), before)}


def _collective(kind: str, buf: torch.Tensor):
    """One blocking all-reduce or broadcast (from rank 0) of `buf` (a leading slice of one
    buffer shared by every message size, so memory stays at the largest size), as a callable."""
    return (lambda: dist.all_reduce(buf)) if kind == "allreduce" else (lambda: dist.broadcast(buf, 0))


def _broadcast_overlap(world: WorldInfo, options: ProfileOptions, nbytes: int, before) -> dict:
    """How many broadcasts posted together progress at once, as the executor posts them: one
    asynchronous broadcast of `nbytes` bytes from every rank, then wait for all; overlap =
    world_size x (one broadcast's time) / (the group's time), between 1 and world_size."""
    bufs = [torch.zeros(max(nbytes // 4, 1), device=world.device)
            for _ in range(world.world_size)]

    def group():
        for work in [dist.broadcast(buf, src, async_op=True) for src, buf in enumerate(bufs)]:
            work.wait()

    single_s, group_s = _time_collectives([lambda: dist.broadcast(bufs[0], 0), group], world,
                                          options, before)
    overlap = min(max(world.world_size * single_s / group_s, 1.0), float(world.world_size))
    return {"broadcast_overlap": overlap,
            "broadcast_overlap_measured": {"message_bytes": nbytes, "one_s": single_s,
                                           "all_ranks_s": group_s}}


def _time_collectives(ops, world: WorldInfo, options: ProfileOptions, before) -> list[float]:
    """Seconds of each collective call in `ops` as training meets it: right after compute
    (`before`, one forward/backward of the model, when the communication threads have gone
    idle), not back to back. Each trial: barrier, compute, then one timed call on every rank; a
    trial's time is its slowest rank's (a broadcast's root returns before the last receiver is
    done). Trials are interleaved (trial i of every op, then trial i + 1), so a drift of a shared
    host's load over the minutes of profiling shifts every message size alike instead of bending
    the size-to-time curve. The mean over the trials, not the median: collectives on shared hosts
    have long tails, and the planner predicts mean step times. Every rank runs the same fixed
    number of collectives."""
    seconds = torch.zeros(len(ops), options.warmup + 2 * options.repeats, dtype=torch.float64)
    for trial in range(seconds.shape[1]):
        for j, op in enumerate(ops):
            dist.barrier()
            before()
            synchronize_device()
            start = time.perf_counter()
            op()
            synchronize_device()
            seconds[j, trial] = time.perf_counter() - start
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds[:, options.warmup:].mean(dim=1).tolist()


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
