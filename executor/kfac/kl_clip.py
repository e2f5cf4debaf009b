"""The last step of a K-FAC update: scale every layer's preconditioned gradient by the KL clip
and write it into the modules' gradients."""
from __future__ import annotations

from typing import Iterable

import torch

from .blocks import KFACBlock


def kl_clip_scale(blocks: Iterable[KFACBlock], results: dict[str, torch.Tensor], *, lr: float,
                  kl_clip: float | None) -> float:
    """nu = min(1, sqrt(kl_clip / |lr^2 sum_l P_l . dW_l|)) over every layer (1 without a clip
    or with a zero sum)."""
    if kl_clip is None:
        return 1.0
    products = [b.grad_inner(results[b.name]) for b in blocks]
    vg_sum = float(torch.stack(products).sum()) * lr ** 2 if products else 0.0
    return min(1.0, (kl_clip / abs(vg_sum)) ** 0.5) if vg_sum != 0.0 else 1.0


def apply_preconditioned(blocks: Iterable[KFACBlock], results: dict[str, torch.Tensor], *,
                         lr: float, kl_clip: float | None) -> None:
    """KL-clip the preconditioned gradients and write them into the modules' gradients."""
    blocks = list(blocks)
    scale = kl_clip_scale(blocks, results, lr=lr, kl_clip=kl_clip)
    for block in blocks:
        if block.module.weight.grad is not None:
            block.set_grad_matrix(results[block.name], scale)
