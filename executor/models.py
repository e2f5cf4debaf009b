"""The model zoo: built-in models by name, or `package.module:callable` for a user's own."""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from planner.errors import InputError


def digits_mlp() -> nn.Module:
    """A 3-layer perceptron for 8x8 digits (input 1x8x8, 10 classes)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers, a max-pool and two linear layers for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = self.pool(self.conv2(x).relu())
        x = self.fc1(x.flatten(1)).relu()
        return self.fc2(x)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": DigitsCNN,
}

DEFAULT_MODEL = "digits-cnn"


def build_model(name: str) -> nn.Module:
    """Instantiate a zoo model or a `package.module:callable`; unknown names raise InputError."""
    if name in ZOO:
        return ZOO[name]()
    if ":" not in name:
        raise InputError(f"unknown model {name!r}: expected one of {', '.join(sorted(ZOO))} "
                         "or package.module:callable")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InputError(f"cannot load model {name!r}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
