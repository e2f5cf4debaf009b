"""Distributed K-FAC strategies as two independent choices (KAISA / kfac-jax style).

The executor's preconditioner and the planner's step model both take a Strategy; the named
algorithms are points of that space:

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

# `dpkfac train --algorithm` names; kaisa becomes a variant by its grad-worker fraction.
TRAIN_ALGORITHMS = ("dp-kfac", "mpd-kfac", "kaisa", "sgd")

# Variants: the names the step model, the what-if rows and run summaries use -> strategy (sgd:
# None). dp-kfac-round-robin is DP-KFAC on the seed's round-robin owners.
STRATEGY_OF: dict[str, Strategy | None] = {
    "sgd": None, "mpd-kfac": MPD_KFAC, "kaisa-comm-opt": KAISA_COMM_OPT,
    "kaisa-mem-opt": KAISA_MEM_OPT, "dp-kfac-round-robin": DP_KFAC, "dp-kfac": DP_KFAC}
VARIANTS = tuple(STRATEGY_OF)


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


def variant_of(algorithm: str, *, workers: int, grad_worker_fraction: Fraction | None = None
               ) -> str:
    """The variant (VARIANTS) a `train --algorithm` runs at `workers` ranks; kaisa's by its
    fraction (default 1, COMM-OPT)."""
    if algorithm not in TRAIN_ALGORITHMS:
        raise InputError(f"unknown algorithm {algorithm!r}; expected one of "
                         f"{', '.join(TRAIN_ALGORITHMS)}")
    if algorithm == "kaisa":
        return kaisa_variant(grad_worker_fraction or Fraction(1), workers=workers)
    return algorithm


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
