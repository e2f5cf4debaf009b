"""scikit-learn's 8x8 digits: a fixed held-out test split, sharded across workers per epoch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DataSplit:
    """Train and test tensors (inputs, integer labels) and what they are."""
    train: TensorDataset
    test: TensorDataset
    name: str = "digits"


SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1024, 256  # samples of a synthetic split


def load_split(spec) -> DataSplit:
    """The data a model trains on: the digits for digits-shaped models, else a seeded synthetic
    split of the model's input shape (random inputs and labels: for timing, not accuracy)."""
    if spec.dataset == "digits":
        return load_digits_split()
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train = spec.random_batch(SYNTHETIC_TRAIN, generator=generator)
    test = spec.random_batch(SYNTHETIC_TEST, generator=generator)
    return DataSplit(train=TensorDataset(*train), test=TensorDataset(*test),
                     name="synthetic (random inputs and labels: accuracy means nothing)")


def load_digits_split() -> DataSplit:
    """The digits set split 80/20 by a fixed permutation (the same on every rank and run)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(len(labels)))
    n_test = int(round(TEST_FRACTION * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return DataSplit(train=TensorDataset(images[train_idx], labels[train_idx]),
                       test=TensorDataset(images[test_idx], labels[test_idx]))


def train_loader(dataset: TensorDataset, *, batch_size: int, rank: int, world_size: int,
                 seed: int) -> tuple[DataLoader, DistributedSampler]:
    """A loader over this rank's shard; call sampler.set_epoch(e) before each epoch."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    # The loader's own generator: starting an epoch must not draw from the global torch RNG, so a
    # resumed run's RNG stream matches an uninterrupted one wherever the checkpoint fell.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=generator), sampler


def test_loader(dataset: TensorDataset, *, batch_size: int = 512) -> DataLoader:
    """The whole test set, in order (every rank evaluates all of it)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
