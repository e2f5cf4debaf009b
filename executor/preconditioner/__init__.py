"""Distributed K-FAC preconditioning with one owner per layer: DP-KFAC and its baselines.

One core with the distribution strategy injected (dpkfac.core.strategy), in parts:

* assignment: who owns each layer, and what this rank captures, builds, decomposes and
  preconditions under the strategy;
* capture: the hooks that record each layer's inputs and output gradients;
* exchange: the collectives (factor all-reduce, fused per-owner broadcasts, their wire format)
  and the bytes they move;
* numerics: the numerical-safety counters per layer and per owner;
* base: the step itself (BaseKFACPreconditioner), one method per layer per phase;
* from_placement: KFACPreconditioner, built from a placement file and the process group.

Strategies: factors LOCAL (DP-KFAC): only a layer's owner captures it and builds A and G from
its own local batch. Factors ALLREDUCED (MPD-KFAC, KAISA): every rank builds every layer's batch
factors and averages them in one fused all-reduce. Shared PRECONDITIONED_GRADIENT: the owner
preconditions the (already all-reduced) gradient and broadcasts it, every step. Shared
DECOMPOSITION (KAISA COMM-OPT): owners broadcast decompositions at each decomposition update and
every rank preconditions every layer.

Numerical safety (NUMERICS_COUNTERS): a running factor that turns NaN/inf is dropped and
rebuilt from the next batch; a decomposition that fails or comes out non-finite is retried with
more damping, else the previous one stays; a layer with no usable decomposition, or whose
preconditioned gradient is non-finite, gets its plain (all-reduced) gradient this step.
Non-finite gradients are the training loop's to handle (it skips such steps on all ranks).
"""
from .assignment import WorkAssignment
from .base import BaseKFACPreconditioner
from .exchange import Exchange
from .from_placement import DPKFAC, KFACPreconditioner

__all__ = ["BaseKFACPreconditioner", "DPKFAC", "Exchange", "KFACPreconditioner",
           "WorkAssignment"]
