"""Batches from a data split: this rank's shard per epoch, the whole test set, and the
profiler's consecutive batches."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def train_loader(dataset: Dataset, *, batch_size: int, rank: int, world_size: int,
                 seed: int) -> tuple[DataLoader, DistributedSampler]:
    """A loader over this rank's shard; call sampler.set_epoch(e) before each epoch."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    # The loader's own generator: starting an epoch must not draw from the global torch RNG, so a
    # resumed run's RNG stream matches an uninterrupted one wherever the checkpoint fell.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=generator), sampler


def test_loader(dataset: Dataset, *, batch_size: int = 512) -> DataLoader:
    """The whole test set, in order (every rank evaluates all of it)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def consecutive_batches(dataset: Dataset, batch_size: int, count: int,
                        device: torch.device) -> Batches:
    """`count` batches of consecutive samples, wrapping around the dataset."""
    size = len(dataset)
    batches = [default_collate([dataset[(i * batch_size + j) % size] for j in range(batch_size)])
               for i in range(count)]
    return [(x.to(device), y.to(device)) for x, y in batches]
