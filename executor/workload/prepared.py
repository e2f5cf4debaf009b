"""A run's workload built and checked before any process group forms: the model, its data
split and its loss, and the entries that record them in profiles and placements."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .checks import check_workload
from .data import DataSplit, load_data
from .loss import DEFAULT_LOSS, LossFn, load_loss
from .models import build_model


@dataclass
class Workload:
    """The model (named `model_name`), its data and its loss (`loss`: the spec it came from)."""
    model_name: str
    model: nn.Module
    split: DataSplit
    loss_fn: LossFn
    loss: str

    def record(self) -> dict:
        """The profile's and the placement's entries: model, data and loss."""
        return {"model": self.model_name, "data": self.split.entry, "loss": self.loss}


def prepare_workload(model_name: str, data: dict, loss: str | None) -> Workload:
    """Build the model (seed torch first for a reproducible initialisation), load the data the
    entry `data` names and the loss; InputError unless they fit one another."""
    model = build_model(model_name)
    split = load_data(data, model)
    loss_fn = load_loss(loss)
    loss = loss or DEFAULT_LOSS
    check_workload(model, split.train, split.test, loss_fn, data=data["spec"], loss=loss)
    return Workload(model_name=model_name, model=model, split=split, loss_fn=loss_fn, loss=loss)
