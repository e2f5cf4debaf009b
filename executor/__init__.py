"""dpkfac's executor: DP-KFAC training with torch.distributed under a fixed placement.

`from executor import DPKFAC` gives the preconditioner. torch is imported on first use, so the
command line can register its subcommands without it.
"""
from __future__ import annotations

__all__ = ["DPKFAC"]


def __getattr__(name: str):
    if name == "DPKFAC":
        from .preconditioner import DPKFAC

        return DPKFAC
    raise AttributeError(f"module 'executor' has no attribute {name!r}")
