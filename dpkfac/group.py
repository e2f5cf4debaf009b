"""Planning inside a torchrun job: rank 0 plans, every rank gets the same placement."""
from __future__ import annotations

from dpkfac.core.errors import InputError


def plan_for_group(profile: dict | str, *, workers: int | None = None, **plan_kwargs) -> dict:
    """dpkfac.plan on rank 0 of the initialised torch.distributed default group, its placement
    (or its InputError) broadcast to every rank; `workers` defaults to the group's size
    (unless a cluster is given). Without a process group it is dpkfac.plan in this process."""

    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    rank, size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    answer: list = [None]
    if rank == 0:
        from planner.library import plan

        try:
            if workers is None and plan_kwargs.get("cluster") is None:
                workers = size
            answer[0] = ("ok", plan(profile, workers, **plan_kwargs))
        except InputError as exc:
            answer[0] = ("error", str(exc))
    if grouped:
        dist.broadcast_object_list(answer, src=0)
    status, value = answer[0]
    if status == "error":
        raise InputError(value)
    return value
