"""The training loss: cross-entropy over the last dimension by default, or a user's
`package.module:callable` called as loss(output, target) -> scalar tensor."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dpkfac.core.errors import InputError

from .callables import is_callable_spec, load_callable

DEFAULT_LOSS = "cross-entropy"
IGNORE_INDEX = -100  # targets F.cross_entropy skips (padding in token sequences)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the last dimension of `output`: (B, C) with (B,) targets,
    (B, T, V) with (B, T) targets, and so on; targets equal to -100 are ignored."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def load_loss(spec: str | None) -> LossFn:
    """The loss `spec` names: None or "cross-entropy" for the default, else a callable."""
    if spec in (None, DEFAULT_LOSS):
        return cross_entropy
    if not is_callable_spec(spec):
        raise InputError(f"--loss {spec!r}: expected {DEFAULT_LOSS} or package.module:callable")
    return load_callable(spec, what="loss")


def loss_name(loss_fn: LossFn | None) -> str:
    """How a profile records an in-process loss function: its module:qualname."""
    if loss_fn is None or loss_fn is cross_entropy:
        return DEFAULT_LOSS
    module = getattr(loss_fn, "__module__", None) or "?"
    return f"{module}:{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"
