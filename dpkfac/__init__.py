"""dpkfac: plan and run DP-KFAC distributed second-order training.

`import dpkfac` gives, in process:
- `dpkfac.plan(profile, workers, *, memory_cap=None, cluster=None, ...)`: a placement document
  (dict) from a profile; pure, needs no torch (planner.library.plan);
- `dpkfac.DPKFAC(model, placement, **hyper)`: the preconditioner (executor.DPKFAC; torch is
  imported on first use).
The `dpkfac` console command is dpkfac.cli; the torch-free core shared by the planner and the
executor is dpkfac.core.
"""
from __future__ import annotations

__all__ = ["plan", "DPKFAC"]


def __getattr__(name: str):
    if name == "plan":
        from planner.library import plan
        return plan
    if name == "DPKFAC":
        from executor import DPKFAC
        return DPKFAC
    raise AttributeError(f"module 'dpkfac' has no attribute {name!r}")
