"""`dpkfac profile`: time the executor's own K-FAC kernels per layer, and the collectives.

Per layer it times exactly the block methods DPKFAC calls (factor construction of A and G,
decomposition of A and G, preconditioning) on one real batch, after warm-up, as a median of
repeats. Under torchrun with more than one process it also times broadcast and all-reduce over
message sizes and fits alpha-beta (seconds, seconds per byte) by least squares.
"""
from __future__ import annotations

import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.curves import fit_cost_curves, fit_line
from planner.schemas import PROFILE_SCHEMA_ID

from .blocks import ComputeMethod, KFACBlock, kfac_layers, make_block
from .data import load_digits_split
from .distributed import WorldInfo
from .models import build_model, input_spec
from .timing import median_time

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


def profile_model(model_name: str, batch_size: int, world: WorldInfo, *,
                  options: ProfileOptions = ProfileOptions(), progress: bool = False) -> dict:
    """Measure `model_name` at `batch_size` per worker; the profile document (dpkfac.profile/1)."""
    torch.manual_seed(0)
    model = build_model(model_name).to(world.device)
    batches = _batches(model_name, batch_size, options.factor_batches, world.device)
    blocks, captured = _accumulate_factors(model, batches, options.factor_decay)
    method = ComputeMethod(options.compute_method)
    with _progress_bar(progress, len(blocks) + 2) as bar:
        layers = []
        for block in blocks:
            layers.append(_profile_layer(block, *captured[block.name], method, options))
            _advance(bar, block.name)
        step = _profile_step(model, *batches[-1], options)
        _advance(bar, "step")
        grad_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        comm = _profile_comm(world, options, message_sizes(grad_bytes))
        _advance(bar, "collectives")
    return {
        "schema": PROFILE_SCHEMA_ID, "model": model_name, "batch_size": batch_size,
        "device": _device_name(world.device), "dtype": "float32",
        "compute_method": method.value, "measured": True, "layers": layers, "step": step,
        "comm": comm,
        "fits": fit_cost_curves(layers),
        "model_grad_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "environment": _environment(world, options),
    }


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


def _accumulate_factors(model: nn.Module, batches, decay: float):
    """Blocks of every K-FAC layer with running factors folded over `batches`, as in training
    (so decompositions are timed on realistic, full-rank factors), and the last batch's inputs,
    output gradients and dW per layer."""
    blocks = [make_block(m, n) for n, m in kfac_layers(model)]
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for block in blocks:
        def fwd(mod, args, out, name=block.name):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: outputs.__setitem__(name, g.detach()))
        hooks.append(block.module.register_forward_hook(fwd))
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


def _profile_layer(block: KFACBlock, a, g, grad, method: ComputeMethod,
                   options: ProfileOptions) -> dict:
    timed = lambda fn: median_time(fn, warmup=options.warmup, repeats=options.repeats)  # noqa: E731
    # decompositions first: timing the factor updates below keeps folding the same batch in
    decompose_a_s, decompose_a_iqr = timed(lambda: block.decompose_a(method, options.damping))
    decompose_g_s, decompose_g_iqr = timed(lambda: block.decompose_g(method, options.damping))
    precondition_s, precondition_iqr = timed(lambda: block.precondition(grad, method, options.damping))
    state_bytes = block.memory_usage()
    factor_a_s, factor_a_iqr = timed(lambda: block.update_factor_a(a, options.factor_decay))
    factor_g_s, factor_g_iqr = timed(lambda: block.update_factor_g(g, options.factor_decay))
    return {
        "name": block.name, "kind": type(block.module).__name__,
        "dim_a": block.dim_a, "dim_g": block.dim_g, "grad_numel": block.grad_numel,
        "factor_a_s": factor_a_s, "factor_g_s": factor_g_s,
        "decompose_a_s": decompose_a_s, "decompose_g_s": decompose_g_s,
        "precondition_s": precondition_s, "state_bytes": state_bytes,
        "rows_a": _rows(block, g), "rows_g": _rows(block, g),
        "spread_iqr_s": {"factor_a": factor_a_iqr, "factor_g": factor_g_iqr,
                         "decompose_a": decompose_a_iqr, "decompose_g": decompose_g_iqr,
                         "precondition": precondition_iqr},
    }


def _rows(block: KFACBlock, grad_output: torch.Tensor) -> int:
    """Rows of the matrices both factors are built from: batch x output positions for a conv
    (one unfolded patch per position), all leading dimensions for a Linear."""
    if isinstance(block.module, nn.Conv2d):
        return int(grad_output.numel() // grad_output.shape[1])
    return int(grad_output.numel() // grad_output.shape[-1])


def _profile_step(model: nn.Module, x, y, options: ProfileOptions) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    fb_s, fb_iqr = median_time(forward_backward, warmup=options.warmup, repeats=options.repeats)
    opt_s, opt_iqr = median_time(optimizer.step, warmup=options.warmup, repeats=options.repeats)
    return {"forward_backward_s": fb_s, "optimizer_s": opt_s,
            "spread_iqr_s": {"forward_backward": fb_iqr, "optimizer": opt_iqr}}


def _profile_comm(world: WorldInfo, options: ProfileOptions, sizes: tuple[int, ...]) -> dict:
    backend = world.backend or ("nccl" if world.device.type == "cuda" else "gloo")
    if world.world_size == 1:
        return {"backend": backend, "world_size": 1, "allreduce": dict(ASSUMED_COMM),
                "broadcast": dict(ASSUMED_COMM), "source": "assumed (single process: nothing to "
                                                           "measure; run under torchrun to fit)"}
    fits = {}
    for kind in ("allreduce", "broadcast"):
        seconds = [_time_collective(kind, n, world, options) for n in sizes]
        fits[kind] = dict(fit_alpha_beta(sizes, seconds), seconds=seconds)
    return {"backend": backend, "world_size": world.world_size, **fits, "source": "measured",
            "message_bytes": list(sizes)}


def _time_collective(kind: str, nbytes: int, world: WorldInfo, options: ProfileOptions,
                     *, back_to_back: int = 8) -> float:
    """Seconds of one collective of `nbytes` bytes, the slowest rank's view.

    As nccl-tests do, `back_to_back` calls run between two barriers; a barrier's own time is
    subtracted and the rest divided by the count; the median over `options.repeats` trials.
    Every rank runs the same fixed number of collectives (min_total_s=0).
    """
    buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=world.device)
    op = (lambda: dist.all_reduce(buf)) if kind == "allreduce" else (lambda: dist.broadcast(buf, 0))

    def burst() -> None:
        dist.barrier()
        for _ in range(back_to_back):
            op()
        dist.barrier()

    def two_barriers() -> None:
        dist.barrier()
        dist.barrier()

    trials = max(3, options.repeats // 3)
    barrier_s, _ = median_time(two_barriers, warmup=1, repeats=trials, min_total_s=0.0)
    total_s, _ = median_time(burst, warmup=1, repeats=trials, min_total_s=0.0)
    seconds = torch.tensor([max(total_s - barrier_s, 0.0) / back_to_back], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # every rank agrees on the slowest
    return float(seconds)


def fit_alpha_beta(nbytes, seconds) -> dict:
    """Least-squares fit of seconds = alpha + beta * nbytes (both >= 0), with its mean relative
    error."""
    line = fit_line(nbytes, seconds)
    return {"alpha_s": line.intercept_s, "beta_s_per_byte": line.slope,
            "fit_mean_rel_error": line.mean_rel_error}


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
