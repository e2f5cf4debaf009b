"""dpkfac.profile: the profile document of a user's model on a user's batch, in process; under
an initialised process group every rank calls it and the collectives are measured too."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dpkfac.core.errors import InputError

from ..runtime.distributed import current_world
from ..workload.checks import check_loss_value, output_of
from ..workload.data import IN_PROCESS
from ..workload.loss import LossFn, cross_entropy, loss_name
from .document import profile_module
from .options import ProfileOptions

Batch = tuple[torch.Tensor, torch.Tensor]


def profile(model: nn.Module, batch: Batch | Sequence[Batch], *, loss_fn: LossFn | None = None,
            name: str | None = None, progress: bool = False, **options) -> dict:
    """The profile document (a dict, schema dpkfac.profile/1) of `model` on this machine.

    model: the user's model (unwrapped or DDP-wrapped), on the device to profile; its
        parameters, buffers and gradients are as before when this returns.
    batch: one per-worker batch (input, target), or a list of them (distinct batches give the
        decompositions realistic, full-rank factors); batch_size is its first dimension.
    loss_fn: loss(output, target) -> scalar; default cross-entropy over the last dimension.
    name: the profile's `model` entry (default: the model's class name).
    options: how carefully to measure, as ProfileOptions' fields (warmup, repeats,
        factor_batches, compute_method, damping, ...); this process's malloc settings are left
        as they are unless keep_freed_memory=True.
    Under an initialised torch.distributed group every rank must call it; kernels and
    collectives are timed on all ranks at once, and every rank gets rank 0's document.
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    device = next(module.parameters()).device
    batches = _as_batches(batch, device)
    loss_fn = loss_fn or cross_entropy
    options = _options(options)
    x, y = batches[0]
    check_loss_value(loss_fn, output_of(module, x, what="the batch").float(), y,
                     loss=loss_name(loss_fn))
    workload = {"model": name or type(module).__name__, "loss": loss_name(loss_fn),
                "data": {"spec": IN_PROCESS, "input_shape": list(x.shape[1:]),
                         "input_dtype": str(x.dtype).split(".")[-1]}}
    saved = _snapshot(module)
    try:
        return profile_module(module, _repeat(batches, options.factor_batches),
                              current_world(device), loss_fn=loss_fn, workload=workload,
                              options=options, progress=progress)
    finally:
        _restore(module, saved)


def _options(given: dict) -> ProfileOptions:
    unknown = sorted(set(given) - set(ProfileOptions.__dataclass_fields__))
    if unknown:
        raise InputError(f"dpkfac.profile: unknown option(s) {', '.join(unknown)}; expected "
                         f"{', '.join(ProfileOptions.__dataclass_fields__)}")
    options = ProfileOptions(**{"keep_freed_memory": False, **given})
    if options.repeats < 3 or options.warmup < 0:  # as `dpkfac profile` requires
        raise InputError("dpkfac.profile: repeats must be >= 3 and warmup >= 0, got "
                         f"{options.repeats} and {options.warmup}")
    if options.link_burst_s < 0:
        raise InputError(f"dpkfac.profile: link_burst_s must be >= 0, got {options.link_burst_s}")
    if options.link_burst_s and options.link_bytes_per_s is None:
        raise InputError("dpkfac.profile: link_burst_s needs link_bytes_per_s")
    return options


def _as_batches(batch, device: torch.device) -> list[Batch]:
    """A list of (input, target) pairs on `device`; InputError for anything else."""
    pairs = [batch] if _is_pair(batch) else list(batch)
    if not pairs or not all(_is_pair(p) for p in pairs):
        raise InputError("batch must be an (input, target) pair of tensors or a list of them")
    if len({tuple(p[0].shape) for p in pairs}) > 1:
        raise InputError("every batch must have the same input shape")
    return [(x.to(device), y.to(device)) for x, y in pairs]


def _is_pair(obj) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 \
        and all(isinstance(t, torch.Tensor) for t in obj)


def _repeat(batches: list[Batch], count: int) -> list[Batch]:
    """At least `count` batches, cycling through the given ones."""
    return [batches[i % len(batches)] for i in range(max(count, len(batches)))]


def _snapshot(module: nn.Module) -> tuple[dict, dict]:
    """Copies of the module's state (parameters and buffers) and of its parameters' gradients."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in module.named_parameters()}
    return state, grads


def _restore(module: nn.Module, saved: tuple[dict, dict]) -> None:
    state, grads = saved
    module.load_state_dict(state)
    for n, p in module.named_parameters():
        p.grad = grads[n]


__all__ = ["profile"]
