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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.schemas import PROFILE_SCHEMA_ID

from .blocks import ComputeMethod, KFACBlock, kfac_layers, make_block
from .data import load_digits_split
from .distributed import WorldInfo
from .models import build_model
from .timing import median_time

# Collective costs assumed when profiling a single process (nothing to measure): loopback gloo.
ASSUMED_COMM = {"alpha_s": 5e-5, "beta_s_per_byte": 1e-9}
MESSAGE_SIZES = tuple(2 ** k for k in range(10, 23, 2))  # 1 KiB .. 4 MiB


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
    batches = _batches(batch_size, options.factor_batches, world.device)
    blocks, captured = _accumulate_factors(model, batches, options.factor_decay)
    method = ComputeMethod(options.compute_method)
    with _progress_bar(progress, len(blocks) + 2) as bar:
        layers = []
        for block in blocks:
            layers.append(_profile_layer(block, *captured[block.name], method, options))
            _advance(bar, block.name)
        step = _profile_step(model, *batches[-1], options)
        _advance(bar, "step")
        comm = _profile_comm(world, options)
        _advance(bar, "collectives")
    return {
        "schema": PROFILE_SCHEMA_ID, "model": model_name, "batch_size": batch_size,
        "device": _device_name(world.device), "dtype": "float32",
        "compute_method": method.value, "measured": True, "layers": layers, "step": step,
        "comm": comm,
        "model_grad_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "environment": _environment(world, options),
    }


def _batches(batch_size: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` consecutive batches of the training split (wrapping around when it runs out)."""
    train = load_digits_split().train
    out = []
    for i in range(count):
        index = (torch.arange(batch_size) + i * batch_size) % len(train)
        x, y = train[index]
        out.append((x.to(device), y.to(device)))
    return out


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
        "rows_a": int(a.numel() // a.shape[1]) if a.dim() == 4 else int(a.numel() // a.shape[-1]),
        "spread_iqr_s": {"factor_a": factor_a_iqr, "factor_g": factor_g_iqr,
                         "decompose_a": decompose_a_iqr, "decompose_g": decompose_g_iqr,
                         "precondition": precondition_iqr},
    }


def _profile_step(model: nn.Module, x, y, options: ProfileOptions) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    fb_s, fb_iqr = median_time(forward_backward, warmup=options.warmup, repeats=options.repeats)
    opt_s, opt_iqr = median_time(optimizer.step, warmup=options.warmup, repeats=options.repeats)
    return {"forward_backward_s": fb_s, "optimizer_s": opt_s,
            "spread_iqr_s": {"forward_backward": fb_iqr, "optimizer": opt_iqr}}


def _profile_comm(world: WorldInfo, options: ProfileOptions) -> dict:
    backend = world.backend or ("nccl" if world.device.type == "cuda" else "gloo")
    if world.world_size == 1:
        return {"backend": backend, "world_size": 1, "allreduce": dict(ASSUMED_COMM),
                "broadcast": dict(ASSUMED_COMM), "source": "assumed (single process: nothing to "
                                                           "measure; run under torchrun to fit)"}
    fits = {}
    for kind in ("allreduce", "broadcast"):
        seconds = [_time_collective(kind, n, world, options) for n in MESSAGE_SIZES]
        fits[kind] = fit_alpha_beta(MESSAGE_SIZES, seconds)
    return {"backend": backend, "world_size": world.world_size, **fits, "source": "measured",
            "message_bytes": list(MESSAGE_SIZES)}


def _time_collective(kind: str, nbytes: int, world: WorldInfo, options: ProfileOptions) -> float:
    buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=world.device)
    op = (lambda: dist.all_reduce(buf)) if kind == "allreduce" else (lambda: dist.broadcast(buf, 0))

    def run() -> None:
        dist.barrier()
        op()

    # a fixed number of runs (min_total_s=0): every rank must issue the same collectives
    barrier_s, _ = median_time(dist.barrier, warmup=1, repeats=max(5, options.repeats // 2),
                               min_total_s=0.0)
    total_s, _ = median_time(run, warmup=options.warmup, repeats=options.repeats, min_total_s=0.0)
    seconds = torch.tensor([max(total_s - barrier_s, 0.0)], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # every rank agrees on the slowest
    return float(seconds)


def fit_alpha_beta(nbytes, seconds) -> dict:
    """Least-squares fit of seconds = alpha + beta * nbytes; both clamped to >= 0.

    Returns alpha_s, beta_s_per_byte and the fit's mean relative error.
    """
    n = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    # weight by 1/t so small messages (which set alpha) count as much as large ones
    w = 1.0 / np.maximum(t, 1e-9)
    design = np.stack([np.ones_like(n), n], axis=1) * w[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, t * w, rcond=None)
    alpha, beta = max(float(alpha), 0.0), max(float(beta), 0.0)
    predicted = alpha + beta * n
    error = float(np.mean(np.abs(predicted - t) / np.maximum(t, 1e-12)))
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "fit_mean_rel_error": error}


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
