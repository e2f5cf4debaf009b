"""Distributed K-FAC strategies as two independent choices (KAISA / kfac-jax style).

One preconditioner core (executor/preconditioner.py) and one cost model (planner/algorithms.py)
take a Strategy; the named algorithms are just points of that space:

| algorithm       | factors      | shared                  |
| --------------- | ------------ | ----------------------- |
| dp-kfac         | owner-local  | preconditioned gradient |
| mpd-kfac        | all-reduced  | preconditioned gradient |
| kaisa-mem-opt   | all-reduced  | preconditioned gradient |  (grad_worker_fraction 1/P)
| kaisa-comm-opt  | all-reduced  | decomposition           |  (grad_worker_fraction 1)

mpd-kfac and kaisa-mem-opt run the same communication pattern; they differ in who owns which
layer (the executor takes owners from the placement; the what-if gives KAISA its own d^3 LPT
assignment). KAISA's HYBRID fractions (1/P < f < 1) are not implemented. No torch here.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction

from .errors import InputError


class FactorMode(str, enum.Enum):
    """Who builds a layer's Kronecker factors, from which batch."""
    LOCAL = "local"              # only the owner, from its own local batch; never communicated
    ALLREDUCED = "allreduced"    # every worker from its local batch, then averaged (all-reduce)


class SharedResult(str, enum.Enum):
    """What an owner sends to everyone after decomposing."""
    PRECONDITIONED_GRADIENT = "preconditioned-gradient"  # every step; owner preconditions
    DECOMPOSITION = "decomposition"                       # every decomposition; all precondition


@dataclass(frozen=True)
class Strategy:
    """One distributed K-FAC strategy: where factors come from and what owners share."""
    factors: FactorMode = FactorMode.LOCAL
    shared: SharedResult = SharedResult.PRECONDITIONED_GRADIENT


DP_KFAC = Strategy(factors=FactorMode.LOCAL, shared=SharedResult.PRECONDITIONED_GRADIENT)
MPD_KFAC = Strategy(factors=FactorMode.ALLREDUCED, shared=SharedResult.PRECONDITIONED_GRADIENT)
KAISA_MEM_OPT = MPD_KFAC
KAISA_COMM_OPT = Strategy(factors=FactorMode.ALLREDUCED, shared=SharedResult.DECOMPOSITION)

# The what-if's algorithm names (planner/algorithms.py) -> strategy; sgd has none.
STRATEGY_OF = {"dp-kfac": DP_KFAC, "dp-kfac-round-robin": DP_KFAC, "mpd-kfac": MPD_KFAC,
               "kaisa-mem-opt": KAISA_MEM_OPT, "kaisa-comm-opt": KAISA_COMM_OPT}

# Elements every owner appends to each of its broadcasts: its cumulative numerical-safety
# counters (executor/preconditioner.py NUMERICS_COUNTERS), in the gradients' dtype.
NUMERICS_ELEMENTS = 4


def parse_fraction(text: str) -> Fraction:
    """A grad-worker fraction from '1', '0.25' or '1/4'; InputError unless 0 < f <= 1."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--grad-worker-fraction {text!r} is not a number "
                         "(e.g. 1, 0.5 or 1/4)") from None
    if not 0 < value <= 1:
        raise InputError(f"--grad-worker-fraction {text!r} must be in (0, 1]")
    return value


def kaisa_variant(fraction: Fraction, *, workers: int) -> str:
    """'kaisa-comm-opt' for f = 1, 'kaisa-mem-opt' for f = 1/P (1 worker: comm-opt).

    InputError for HYBRID fractions in between, which this executor does not implement."""
    if fraction == 1:
        return "kaisa-comm-opt"
    if fraction * workers == 1:
        return "kaisa-mem-opt"
    raise InputError(f"--grad-worker-fraction {fraction}: KAISA HYBRID (1/P < f < 1) is not "
                     f"implemented; with {workers} workers use 1 (COMM-OPT: decompositions "
                     f"broadcast, everyone preconditions) or 1/{workers} (MEM-OPT: owners "
                     "precondition and broadcast the preconditioned gradient)")
