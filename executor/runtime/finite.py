"""Whether a tensor holds only finite numbers, in one pass that allocates nothing."""
from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of `t` is NaN or inf (one device sync). Its sum is finite then
    unless it overflows, so only a non-finite sum pays for the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
