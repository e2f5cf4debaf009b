"""Process-group set-up and the collective helpers every part of the executor uses (NCCL on CUDA,
gloo on CPU): the fused gradient average, and object broadcast, all-gather and gather."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .finite import all_finite


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits: rank, world size, and the device it computes on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group


def launched_by_torchrun() -> bool:
    """True when torchrun (or any env:// launcher) set the rendezvous variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(*, timeout_s: float = 600.0, device: str | None = None) -> WorldInfo:
    """Join the env:// process group under torchrun; world size 1 without it.

    timeout_s: seconds any collective (and the rendezvous) may wait before failing. With gloo a
    collective past it raises; with NCCL the watchdog aborts the process (TORCH_NCCL_ASYNC_ERROR_
    HANDLING, on by default), so a dead or stuck rank never hangs the job.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not launched_by_torchrun():
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        return WorldInfo(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return WorldInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=local_rank, device=dev, backend=backend)


def current_world(device: torch.device) -> WorldInfo:
    """This process's place in the already initialised default group (world size 1 when there
    is none), computing on `device`."""
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    return WorldInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device,
                     backend=dist.get_backend())


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_rank_and_size(process_group=None) -> tuple[int, int]:
    """(rank, world size) of the default or given group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


class PendingAverage:
    """A fused all-reduce of `tensors` in flight (start_gradient_average): wait() finishes it."""

    def __init__(self, tensors: list[torch.Tensor], world_size: int, process_group=None) -> None:
        self.tensors, self.world_size = tensors, world_size
        self.flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else None
        self.work = None
        if self.flat is not None and world_size > 1:
            self.work = dist.all_reduce(self.flat, group=process_group, async_op=True)

    def wait(self) -> tuple[int, bool]:
        """Wait for the all-reduce, average, check the result is finite, copy it back into the
        tensors; returns (bytes of the fused buffer, whether it holds no NaN or inf)."""
        if self.flat is None:
            return 0, True
        flat = self.flat
        if self.work is not None:
            self.work.wait()
            flat.div_(self.world_size)
        finite = all_finite(flat)
        offset = 0
        for t in self.tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return flat.numel() * flat.element_size(), finite


def start_gradient_average(tensors: list[torch.Tensor], world_size: int,
                           process_group=None) -> PendingAverage:
    """Start averaging `tensors` across ranks in one fused asynchronous all-reduce; the
    tensors hold the averages once the returned PendingAverage's wait() returns. Between the
    two, the caller may compute (not touching the tensors): the overlapped step."""
    return PendingAverage(tensors, world_size, process_group)


def average_gradients_(tensors: list[torch.Tensor], world_size: int,
                       process_group=None) -> tuple[int, bool]:
    """Average tensors across ranks in one fused all-reduce and check the result is finite.

    Returns the bytes of the fused buffer and whether it holds no NaN or inf (one check of the
    flat buffer; identical on every rank, so every rank takes the same decision).
    """
    return start_gradient_average(tensors, world_size, process_group).wait()


def allreduce_mean_(tensors: list[torch.Tensor], world_size: int, process_group=None) -> int:
    """Average tensors across ranks in one fused all-reduce; returns the bytes of the buffer."""
    return average_gradients_(tensors, world_size, process_group)[0]


def broadcast_parameters(model: nn.Module, world: WorldInfo) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's."""
    if world.world_size > 1:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def broadcast_object(obj: object, world: WorldInfo) -> object:
    """Rank 0's `obj` on every rank (pickled over the default group)."""
    if world.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object, world: WorldInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled over the default group)."""
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_rank0(obj: object, *, rank: int, world_size: int) -> list | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
