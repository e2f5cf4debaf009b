"""dpkfac: plan and run DP-KFAC distributed second-order training.

`import dpkfac` gives, in process:
- `dpkfac.profile(model, batch, *, loss_fn=None, ...)`: the profile document (dict) of a model
  on this machine; under an initialised process group every rank calls it and the collectives
  are measured too (executor.profiling.inprocess.profile);
- `dpkfac.plan(profile, workers, *, memory_cap=None, cluster=None, ...)`: a placement document
  (dict) from a profile; pure, needs no torch (planner.library.plan);
- `dpkfac.plan_for_group(profile, **kwargs)`: plan on rank 0 of a torchrun job, the same
  placement on every rank (dpkfac.group);
- `dpkfac.DPKFAC(model, placement, **hyper)`: the preconditioner (executor.DPKFAC);
- `dpkfac.start_gradient_average(tensors, world_size)`: the fused gradient all-reduce started
  asynchronously, for the overlapped step (DPKFAC.prepare / finish);
- `dpkfac.GradientBuckets(model, world_size)`: the gradient all-reduce in buckets posted from
  backward as gradients become ready (arm, backward, post_remaining, wait), for loops without
  DDP (with DDP, DDP's own buckets do this).
torch is imported on first use of what needs it. The `dpkfac` console command is dpkfac.cli;
the torch-free core shared by the planner and the executor is dpkfac.core.
"""
from __future__ import annotations

__all__ = ["profile", "plan", "plan_for_group", "DPKFAC", "start_gradient_average",
           "GradientBuckets"]


def __getattr__(name: str):
    if name == "profile":
        from executor.profiling.inprocess import profile
        return profile
    if name == "plan":
        from planner.library import plan
        return plan
    if name == "plan_for_group":
        from dpkfac.group import plan_for_group
        return plan_for_group
    if name == "start_gradient_average":
        from executor.runtime.distributed import start_gradient_average
        return start_gradient_average
    if name == "GradientBuckets":
        from executor.runtime.buckets import GradientBuckets
        return GradientBuckets
    if name == "DPKFAC":
        from executor import DPKFAC
        return DPKFAC
    raise AttributeError(f"module 'dpkfac' has no attribute {name!r}")
