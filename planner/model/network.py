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

from dataclasses import dataclass
from typing import Sequence

from dpkfac.core.profile import AlphaBeta, CommCosts, MeasuredPoints


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


@dataclass(frozen=True)
class Network:
    """Per-hop costs of the two collectives the executor uses, independent of the rank count.

    broadcast_hop / allreduce_hop: alpha' seconds and beta' seconds per byte of one hop of a
    pipelined broadcast / ring all-reduce (see the forms above). `source` says where they came
    from ("profile" rescaled from the measured world size, or "cluster" from topology).

    With measured points (a profile measured at `measured_ranks` > 1 ranks), a collective of n
    bytes at p ranks costs the measured time at n scaled by model(p, n) / model(measured_ranks,
    n): exactly the measurement at the measured rank count, the per-hop forms elsewhere.

    broadcast_overlap: how many of a step's broadcasts, posted together, progress at once (1:
    one after another, as on one NCCL stream; gloo runs asynchronous collectives on 2 threads,
    and the profiler measures it).

    broadcast_root_points: a broadcast root's own seconds from the last rank's post to its
    return, measured (None: bounded by the broadcast's least time, broadcast_root_s).
    """
    broadcast_hop: AlphaBeta
    allreduce_hop: AlphaBeta
    source: str = "profile"
    measured_ranks: int = 1
    broadcast_points: MeasuredPoints | None = None
    allreduce_points: MeasuredPoints | None = None
    broadcast_overlap: float = 1.0
    broadcast_root_points: MeasuredPoints | None = None

    def broadcast_group_s(self, seconds: Sequence[float]) -> float:
        """Seconds for broadcasts taking `seconds` each alone, posted together: their sum spread
        over `broadcast_overlap` lanes, never less than the longest."""
        return max(max(seconds, default=0.0), sum(seconds) / self.broadcast_overlap)

    def broadcast_queue_end_s(self, arrivals: Sequence[float], seconds: Sequence[float]
                              ) -> tuple[float, int]:
        """When broadcasts taking `seconds` each alone end, broadcast k free to start at
        arrivals[k] (nondecreasing: the order they are posted in), on `broadcast_overlap`
        lanes; and the index k whose term sets that end. The end is the largest of
        arrivals[k] + seconds[k] (one alone) and arrivals[k] + (seconds[k] + ... ) /
        broadcast_overlap (those from k on, spread over the lanes): exact for one lane
        (a queue), and with equal arrivals exactly broadcast_group_s after them. At least
        one broadcast."""
        if all(a == arrivals[0] for a in arrivals):
            return arrivals[0] + self.broadcast_group_s(seconds), 0
        best, first, tail = float("-inf"), 0, 0.0
        for k in range(len(seconds) - 1, -1, -1):
            tail += seconds[k]
            end = arrivals[k] + max(seconds[k], tail / self.broadcast_overlap)
            if end >= best:
                best, first = end, k
        return best, first

    def broadcast_s(self, *, ranks: int, nbytes: float) -> float:
        """Seconds for one broadcast of `nbytes` bytes among `ranks` ranks (0 at one rank)."""
        _check_ranks(ranks)
        if ranks == 1:
            return 0.0
        return self._shaped(self.broadcast_points, self._broadcast_model, ranks, nbytes)

    def allreduce_s(self, *, ranks: int, nbytes: float) -> float:
        """Seconds for one ring all-reduce of `nbytes` bytes among `ranks` ranks (0 at one rank)."""
        _check_ranks(ranks)
        if ranks == 1:
            return 0.0
        return self._shaped(self.allreduce_points, self._allreduce_model, ranks, nbytes)

    def broadcast_root_s(self, *, ranks: int, nbytes: float) -> float:
        """Seconds a broadcast of `nbytes` bytes costs its root once every rank has posted it:
        the root returns once its bytes are in its sockets' buffers while the receivers still
        read them. Measured (broadcast_root_points, interpolated; the same at any rank count
        and link rate: the root's own copies), at most the whole broadcast's time; else the
        collective's fixed cost, taken as the least time of a broadcast (an upper bound: that
        also carries the first bytes across). 0 at one rank."""
        if self.broadcast_root_points is None or ranks == 1:
            return self.broadcast_floor_s(ranks=ranks, min_bytes=0.0, max_bytes=0.0)
        return min(self.broadcast_root_points.time(nbytes, beyond_s_per_byte=0.0),
                   self.broadcast_s(ranks=ranks, nbytes=nbytes))

    def broadcasts_floor_s(self, *, ranks: int, total_bytes: float) -> float:
        """A proven lower bound on the seconds of one or more broadcasts among `ranks` ranks
        that together move `total_bytes` bytes. Model only: one broadcast of everything (k
        broadcasts cost k (p-1) alpha' + N beta', spread over broadcast_overlap lanes, and at
        least the latency of one). With measured points, whose curve need not be
        additive: the least time of any single broadcast of at most `total_bytes` bytes (the
        least measured-curve time up to there times the least model ratio, which sits at one of
        the size range's ends)."""
        _check_ranks(ranks)
        if ranks == 1:
            return 0.0
        model = self._broadcast_model
        if self.broadcast_points is None:
            return max(model(ranks, total_bytes) / self.broadcast_overlap, model(ranks, 0.0))
        ratio = min(_ratio(model(ranks, n), model(self.measured_ranks, n))
                    for n in (0.0, total_bytes))
        return self.broadcast_points.floor_s(total_bytes) * ratio

    def broadcast_floor_s(self, *, ranks: int, min_bytes: float, max_bytes: float) -> float:
        """A proven lower bound on the seconds of ONE broadcast of min_bytes..max_bytes bytes
        among `ranks` ranks, alone. Model only: the model at `min_bytes` (it grows with the
        size). With measured points: the least measured-curve time up to `max_bytes` times the
        least model ratio (at one of the range's ends), as broadcasts_floor_s."""
        _check_ranks(ranks)
        if ranks == 1:
            return 0.0
        model = self._broadcast_model
        if self.broadcast_points is None:
            return model(ranks, min_bytes)
        return self.broadcasts_floor_s(ranks=ranks, total_bytes=max_bytes)

    def allreduce_floor_s(self, *, ranks: int, nbytes: float) -> float:
        """A proven lower bound on the seconds of one all-reduce of at least `nbytes` bytes
        among `ranks` ranks. Model only: the model at `nbytes` (it grows with the size). With
        measured points: the least measured time (the curve is interpolated between them, flat
        below and rising beyond) times the least model ratio to the measured rank count (a
        ratio of two affine functions of the size: least at 0 bytes or as the size grows)."""
        _check_ranks(ranks)
        if ranks == 1:
            return 0.0
        model = self._allreduce_model
        if self.allreduce_points is None:
            return model(ranks, nbytes)
        p0 = self.measured_ranks
        ratio = 1.0 if ranks == p0 else min(
            _ratio(model(ranks, 0.0), model(p0, 0.0)),
            _ratio(model(ranks, 1.0) - model(ranks, 0.0), model(p0, 1.0) - model(p0, 0.0)))
        return min(self.allreduce_points.seconds) * ratio

    def _broadcast_model(self, ranks: int, nbytes: float) -> float:
        hop = self.broadcast_hop
        return (ranks - 1) * hop.alpha_s + nbytes * hop.beta_s_per_byte

    def _allreduce_model(self, ranks: int, nbytes: float) -> float:
        hop = self.allreduce_hop
        return 2 * (ranks - 1) * hop.alpha_s + 2 * (ranks - 1) / ranks * nbytes * hop.beta_s_per_byte

    def _shaped(self, points: MeasuredPoints | None, model, ranks: int, nbytes: float) -> float:
        """The model's time, or the measured time rescaled by the model to `ranks` ranks."""
        if points is None:
            return model(ranks, nbytes)
        p0 = self.measured_ranks
        beyond = model(p0, nbytes + 1.0) - model(p0, nbytes)  # the fit's seconds per byte
        measured = points.time(nbytes, beyond_s_per_byte=beyond)
        return measured if ranks == p0 else measured * _ratio(model(ranks, nbytes),
                                                              model(p0, nbytes))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 1.0


def network_from_profile(costs: CommCosts) -> Network:
    """The per-hop network implied by a profile's measured collectives (rescaled as above),
    with the measured points when the profile has them."""
    measured = costs.world_size > 1
    return Network(broadcast_hop=broadcast_per_hop(costs.broadcast, measured_ranks=costs.world_size),
                   allreduce_hop=allreduce_per_hop(costs.allreduce, measured_ranks=costs.world_size),
                   source="profile", measured_ranks=costs.world_size,
                   broadcast_points=costs.broadcast_points if measured else None,
                   allreduce_points=costs.allreduce_points if measured else None,
                   broadcast_overlap=costs.broadcast_overlap,
                   broadcast_root_points=costs.broadcast_root_points if measured else None)
