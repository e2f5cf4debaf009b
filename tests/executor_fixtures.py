"""Placements and tiny models for executor tests, built without the planner's solvers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from executor.runtime.distributed import allreduce_mean_

from dpkfac.core.schemas import PLACEMENT_SCHEMA_ID


def placement_dict(model: str, assignment: dict[str, int], world_size: int, *,
                   factor_update_freq: int = 1, inv_update_freq: int = 1,
                   compute_method: str = "eigen") -> dict:
    """A valid dpkfac.placement/1 document for `assignment` (predictions are zero)."""
    return {
        "schema": PLACEMENT_SCHEMA_ID, "model": model, "world_size": world_size,
        "profile": {"path": "(test)", "sha256": ""}, "solver": "manual", "status": "heuristic",
        "config": {"factor_update_freq": factor_update_freq, "inv_update_freq": inv_update_freq,
                   "batch_size": 16, "compute_method": compute_method},
        "assignment": dict(assignment),
        "predicted": {"step_time_s": 0.0, "second_order_s": 0.0, "lower_bound_s": 0.0,
                      "per_worker": [{"rank": r, "compute_s": 0.0, "memory_bytes": 0}
                                     for r in range(world_size)]},
    }


def small_cnn() -> nn.Module:
    """Conv (with and without bias) and Linear layers, including a 3-D-input Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(2),                      # (N, 6, 9): tokens for the next Linear
        nn.Linear(9, 5), nn.ReLU(),
        nn.Flatten(), nn.Linear(30, 10),
    )


SMALL_CNN_LAYERS = ["0", "2", "5", "8"]


def random_batches(seed: int, count: int,
                   batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` seeded batches of 1x8x8 inputs and labels in 0..9."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=gen),
             torch.randint(0, 10, (batch,), generator=gen)) for _ in range(count)]


def train_steps(model: nn.Module, precond, batches, *, world_size: int, lr: float = 0.05,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """SGD steps (momentum 0.9, or `optimizer`) with gradients averaged across ranks,
    preconditioned before each update."""
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        allreduce_mean_([p.grad for p in model.parameters()], world_size)
        precond.step()
        optimizer.step()
