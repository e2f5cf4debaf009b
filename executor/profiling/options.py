"""How carefully `dpkfac profile` measures."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileOptions:
    """Measurement settings: compute method and damping of the timed K-FAC kernels, untimed
    warm-up runs and timed repeats, batches folded into the factors before timing."""
    compute_method: str = "eigen"
    damping: float = 0.03
    warmup: int = 3
    repeats: int = 15
    factor_batches: int = 16  # distinct batches folded into the factors before timing
    factor_decay: float = 0.95
    flush_denormal: bool = True  # as `train` does by default (runtime.cpu_runtime)
    keep_freed_memory: bool = True  # as `train` does by default (runtime.cpu_runtime)
    link_bytes_per_s: float | None = None  # the links' payload rate, for bandwidth what-ifs
    link_burst_s: float = 0.0  # the links' token bucket, seconds of their rate (shaped links)
