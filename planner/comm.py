"""Alpha-beta (Hockney) collective costs rescaled from the measured world size to p ranks.

A profile measures each collective as one call costing ``alpha_s + n * beta_s_per_byte`` seconds
at ``comm.world_size`` = p0 ranks. The planner needs the cost at other rank counts p, so it reads
the measured line through the usual algorithm forms (DOMAIN.md) and solves for the per-hop
values alpha', beta':

* pipelined broadcast:  T(p, n) = (p - 1) alpha' + n beta'
* ring all-reduce:      T(p, n) = 2 (p - 1) alpha' + 2 (p - 1) / p * n beta'

When p0 == 1 nothing was actually communicated, and the measured values are taken as the
per-hop values. With p == 1 every collective costs 0 seconds and moves 0 bytes.
"""
from __future__ import annotations

from .profile import AlphaBeta


def _check_ranks(ranks: int) -> None:
    if ranks < 1:
        raise ValueError(f"rank count must be >= 1, got {ranks}")


def broadcast_per_hop(measured: AlphaBeta, *, measured_ranks: int) -> AlphaBeta:
    """Per-hop (alpha', beta') of a pipelined broadcast measured at `measured_ranks` ranks.

    alpha' in seconds, beta' in seconds per byte.
    """
    _check_ranks(measured_ranks)
    hops = max(measured_ranks - 1, 1)
    return AlphaBeta(alpha_s=measured.alpha_s / hops, beta_s_per_byte=measured.beta_s_per_byte)


def allreduce_per_hop(measured: AlphaBeta, *, measured_ranks: int) -> AlphaBeta:
    """Per-hop (alpha', beta') of a ring all-reduce measured at `measured_ranks` ranks.

    alpha' in seconds, beta' in seconds per byte.
    """
    _check_ranks(measured_ranks)
    if measured_ranks == 1:
        return measured
    p0 = measured_ranks
    return AlphaBeta(alpha_s=measured.alpha_s / (2 * (p0 - 1)),
                     beta_s_per_byte=measured.beta_s_per_byte * p0 / (2 * (p0 - 1)))


def broadcast_s(measured: AlphaBeta, *, measured_ranks: int, ranks: int, nbytes: float) -> float:
    """Seconds for one broadcast of `nbytes` bytes among `ranks` ranks (0 when ranks == 1)."""
    _check_ranks(ranks)
    if ranks == 1:
        return 0.0
    hop = broadcast_per_hop(measured, measured_ranks=measured_ranks)
    return (ranks - 1) * hop.alpha_s + nbytes * hop.beta_s_per_byte


def allreduce_s(measured: AlphaBeta, *, measured_ranks: int, ranks: int, nbytes: float) -> float:
    """Seconds for one ring all-reduce of `nbytes` bytes among `ranks` ranks (0 when ranks == 1)."""
    _check_ranks(ranks)
    if ranks == 1:
        return 0.0
    hop = allreduce_per_hop(measured, measured_ranks=measured_ranks)
    return 2 * (ranks - 1) * hop.alpha_s + 2 * (ranks - 1) / ranks * nbytes * hop.beta_s_per_byte


def ring_allreduce_bytes(*, ranks: int, nbytes: float) -> float:
    """Bytes one rank sends plus receives in a ring all-reduce of `nbytes` bytes:
    2 (p-1)/p * n sent and as much received, 4 (p-1)/p * n in all (0 at p == 1).

    Every traffic figure in the project (planner, what-if, executor) counts sent + received.
    """
    _check_ranks(ranks)
    return 4 * (ranks - 1) / ranks * nbytes
