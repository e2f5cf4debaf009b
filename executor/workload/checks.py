"""Checks of a model, its data and its loss against each other, run on every rank before any
process group forms: one InputError naming what does not fit."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from dpkfac.core.errors import InputError

from .callables import call_checked
from .loss import IGNORE_INDEX, LossFn, cross_entropy

PROBE_SAMPLES = 2  # samples of the probe batch the model, targets and loss are checked on


def first_samples(dataset: Dataset, count: int = PROBE_SAMPLES) -> tuple[torch.Tensor, ...]:
    """The dataset's first `count` samples collated into one batch."""
    return default_collate([dataset[i] for i in range(min(count, len(dataset)))])


def output_of(model: nn.Module, x: torch.Tensor, *, what: str) -> torch.Tensor:
    """model(x) in eval mode without gradients; InputError (naming the shape and dtype it got
    and `what` fed it) if the model cannot take it or does not return one tensor."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise InputError(f"the model cannot take inputs of shape {tuple(x.shape)} ({x.dtype}) "
                         f"from {what}: {type(exc).__name__}: {detail}") from None
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor):
        raise InputError(f"the model returned {type(out).__name__} for inputs from {what}, "
                         "expected one tensor")
    return out


def check_workload(model: nn.Module, train: Dataset, test: Dataset, loss_fn: LossFn, *,
                   data: str, loss: str) -> None:
    """InputError unless `model` takes the data's inputs, its class-label targets lie within
    the model's outputs (default loss), and the loss returns a finite scalar on them."""
    for part, dataset in (("train", train), ("test", test)):
        x, y = first_samples(dataset)
        out = output_of(model, x, what=f"data {data!r} ({part})")
        if loss_fn is cross_entropy:
            _check_labels(dataset, y, out, data=data, part=part)
        check_loss_value(loss_fn, out.float(), y.to(out.device), loss=loss)


def check_loss_value(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor, *, loss: str) -> None:
    """InputError unless loss_fn(out, y) is a finite one-element tensor."""
    value = call_checked(loss_fn, out, y, what="loss", spec=loss)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"loss {loss!r} returned {shape}, expected a scalar tensor")
    if not bool(torch.isfinite(value)):
        raise InputError(f"loss {loss!r} returned {float(value)} on the first samples, "
                         "expected a finite scalar")


def _check_labels(dataset: Dataset, y: torch.Tensor, out: torch.Tensor, *, data: str,
                  part: str) -> None:
    """Class labels (integer targets) in 0..C-1 for an output with C classes in its last
    dimension (-100 is ignored); all targets of a tensor dataset, else the probe batch."""
    if y.is_floating_point():
        raise InputError(f"data {data!r} ({part}): targets are {y.dtype}; the default "
                         "cross-entropy loss needs integer class labels (or pass --loss)")
    if tuple(y.shape) != tuple(out.shape[:-1]):
        raise InputError(f"data {data!r} ({part}): targets of shape {tuple(y.shape)} do not "
                         f"match the model's output {tuple(out.shape)} (cross-entropy over the "
                         "last dimension needs the output's shape without it)")
    labels = dataset.tensors[1] if isinstance(dataset, TensorDataset) else y
    used = labels[labels != IGNORE_INDEX]
    classes = out.shape[-1]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= classes):
        raise InputError(f"data {data!r} ({part}): labels range over {int(used.min())}.."
                         f"{int(used.max())}, but the model's output has {classes} classes "
                         f"(0..{classes - 1})")
