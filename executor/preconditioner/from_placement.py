"""KFACPreconditioner: distributed K-FAC under a placement file, in the process group this
process belongs to; DPKFAC is it with its default strategy."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from dpkfac.core.placement import check_placement_matches, load_placement, precondition_split
from dpkfac.core.strategy import DP_KFAC, Strategy

from ..kfac import ComputeMethod, make_block, require_kfac_layers
from .assignment import WorkAssignment
from .base import BaseKFACPreconditioner
from .exchange import Exchange


class KFACPreconditioner(BaseKFACPreconditioner):
    """Distributed K-FAC with one owner per layer, as the placement assigns them.

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        placement: a dpkfac.placement/1 file path or its parsed dict (who owns which layer).
        strategy: factors LOCAL/ALLREDUCED and shared PRECONDITIONED_GRADIENT/DECOMPOSITION
            (dpkfac.core.strategy); default DP-KFAC.
        lr: learning rate (float or a callable returning it), used by the KL clip.
        damping: Tikhonov damping added to the Kronecker factors.
        factor_decay: running-average decay of the factors.
        kl_clip: KL-clip bound; None disables clipping.
        factor_update_freq / inv_update_freq: steps between factor / decomposition updates;
            default: the placement's config.
        compute_method: "eigen" or "inverse"; default: the placement's config, else eigen.
        process_group: the group to communicate in (default group when None).
        precise_timing: synchronise the device around each phase so phase times are exact.
        stagger_decompositions: follow the placement's `decomposition_step` schedule (spread
            each owner's decompositions over the inv_update_freq steps of a cycle).
            The placement's `precondition_split` (layers whose preconditioning every rank
            shares, by rows of the G side) is followed under DP-KFAC, ignored otherwise.
        factor_dtype: dtype of the factors, decompositions and preconditioning (default
            float32); captured tensors (bf16 under autocast) are cast to it, and preconditioned
            gradients back to the gradients' dtype.
        grad_scaler: the torch.amp.GradScaler of the backward passes, or None. Its loss scale s
            is divided out of G (1 / s**2); call grad_scaler.unscale_(optimizer) before
            step(). step() then skips (returns False, `skipped_steps` += 1, `steps` unchanged,
            captured tensors dropped) when any gradient of the model is NaN/inf.
        overlap: whether prepare() runs the local phases (DP-KFAC: an owner's factors and
            decompositions) for the overlapped step: start the gradient all-reduce
            (dpkfac.start_gradient_average), prepare(), wait, then finish() (or rollback() for
            non-finite averages); the same results as step(). False: prepare() does nothing.

    Gradient accumulation: backward K times (the loss of each micro-batch of B samples being
    its mean divided by K; under DDP, all but the last in `model.no_sync()`), then step()
    once: the factors are those of the concatenated K*B samples, equal to one backward over the
    whole batch. Captured activations of all K micro-batches are held until step().
    """

    def __init__(
        self,
        model: nn.Module,
        placement: str | os.PathLike | dict,
        *,
        strategy: Strategy = DP_KFAC,
        lr: float | Callable[[], float] = 0.1,
        damping: float = 0.03,
        factor_decay: float = 0.95,
        kl_clip: float | None = 0.001,
        factor_update_freq: int | None = None,
        inv_update_freq: int | None = None,
        compute_method: str | ComputeMethod | None = None,
        process_group: Any = None,
        precise_timing: bool = False,
        stagger_decompositions: bool = False,
        factor_dtype: torch.dtype = torch.float32,
        grad_scaler: Any = None,
        overlap: bool = True,
    ) -> None:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.placement = load_placement(placement)
        config = self.placement["config"]
        exchange = Exchange.over(process_group)
        layers = require_kfac_layers(module, what="the model")
        names = [name for name, _ in layers]
        check_placement_matches(self.placement, layer_names=names,
                                world_size=exchange.world_size, source="placement")
        blocks = {name: make_block(m, name) for name, m in layers}
        split = precondition_split(self.placement, source="placement",
                                   dims_g={name: b.dim_g for name, b in blocks.items()})
        work = WorkAssignment.from_placement(self.placement, names, rank=exchange.rank,
                                             strategy=strategy, stagger=stagger_decompositions,
                                             split=split)
        super().__init__(
            blocks, work, exchange, lr=lr,
            damping=damping, factor_decay=factor_decay, kl_clip=kl_clip,
            factor_update_freq=factor_update_freq or config["factor_update_freq"],
            inv_update_freq=inv_update_freq or config["inv_update_freq"],
            compute_method=ComputeMethod(compute_method or config.get("compute_method", "eigen")),
            precise_timing=precise_timing, stagger_decompositions=stagger_decompositions,
            factor_dtype=factor_dtype, grad_scaler=grad_scaler, parameters=module.parameters(),
            overlap=overlap)


DPKFAC = KFACPreconditioner  # the public name: DP-KFAC is the default strategy
