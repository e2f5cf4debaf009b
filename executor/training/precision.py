"""Mixed precision for `train --autocast`: the forward under torch.autocast in bf16 or fp16, and
for fp16 a GradScaler (loss scaling; steps whose scaled gradients overflow are skipped)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: full precision) on a device type, and the loss scaler."""
    dtype: torch.dtype | None = None
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def of(cls, autocast: str | None, device: torch.device) -> "Precision":
        """The settings for `--autocast {bf16,fp16}` (None: none; checked by check_config)
        on `device`."""
        if autocast is None:
            return cls(device_type=device.type)
        dtype = AUTOCAST_DTYPES[autocast]
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        return cls(dtype=dtype, device_type=device.type, scaler=scaler)

    def autocast(self):
        """The forward's context: torch.autocast at this dtype, or nothing."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
