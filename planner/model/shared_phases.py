"""The shared phases of one simulated DP-KFAC-family step (planner.model.simulate, item 6):
preconditioning and the collectives that share its results: decomposition broadcasts, the
owners' ordered gradient broadcasts and the split layers' shares all-reduce. Seconds."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dpkfac.core.profile import Profile
from dpkfac.core.step import NUMERICS_ELEMENTS
from dpkfac.core.strategy import SharedResult, Strategy
from planner.model.costs import (
    Split,
    allreduce_wire_s,
    decomposition_sizes,
    per_owner,
    precondition_counts,
    precondition_per_worker_s,
    split_shares,
    unsplit_mask,
)
from planner.model.network import Network
from planner.model.timeline import Segment, Timeline


def shared_phases(line: Timeline, profile: Profile, *, strategy: Strategy,
                   owners: Sequence[int], workers: int, slot: int, speed: np.ndarray,
                   net: Network, split: Split, shares_first: bool = False,
                   network: Network | None = None) -> float:
    """Preconditioning and the owners' broadcasts of one step (decomposition slot `slot`);
    returns the seconds of its collectives. shares_first (the overlapped step): every rank
    preconditions its shares of the split layers first and their all-reduce runs while it
    preconditions its own layers (network: simulate_step's, for its wire seconds)."""
    layers = profile.layers
    owned = np.bincount(np.asarray(owners, dtype=int), minlength=workers)
    counters = NUMERICS_ELEMENTS * profile.dtype_bytes
    if strategy.shared is SharedResult.DECOMPOSITION:
        seconds = 0.0
        if slot == 0:
            sizes = per_owner(decomposition_sizes(profile), owners, workers)
            seconds = _broadcasts(line, net, sizes, owned, workers, counters)
        line.compute("precondition", np.full(workers, sum(l.precondition_s for l in layers))
                     / speed, [len(layers)] * workers)
        return seconds
    then_s = _split_allreduce_s(profile, workers=workers, net=net, split=split)
    costs = np.asarray([l.precondition_s for l in layers], dtype=float)
    whole = unsplit_mask(profile, split)
    own_s = per_owner(costs * whole, owners, workers)
    own_counts = per_owner(whole.astype(float), owners, workers)
    overlapped = shares_first and then_s is not None
    seconds = 0.0
    if slot == 0 and overlapped:  # own layers under the split decompositions' broadcasts
        decomposing, seconds = _split_decomposition_broadcasts(
            line, profile, owners=owners, workers=workers, net=net, split=split, posted=True)
        line.compute("precondition", own_s / speed, own_counts)
        line.wait(decomposing)
        _compute_shares(line, profile, split=split, costs=costs, speed=speed)
        return seconds + _ordered_broadcasts(line, net, per_owner(nbytes_of(profile) * whole,
                                                                  owners, workers),
                                             own_counts, workers, counters, then_s=then_s)
    if slot == 0:
        _, seconds = _split_decomposition_broadcasts(line, profile, owners=owners,
                                                     workers=workers, net=net, split=split)
    summing = None
    if overlapped:
        _compute_shares(line, profile, split=split, costs=costs, speed=speed)
        summing = _post_share_sum(line, profile, network=network, split=split, seconds=then_s,
                                  own_s=own_s / speed, own_counts=own_counts)
    else:
        line.compute("precondition",
                     precondition_per_worker_s(profile, owners=owners, workers=workers,
                                               split=split) / speed,
                     precondition_counts(profile, owners=owners, workers=workers, split=split))
    seconds += _ordered_broadcasts(line, net, per_owner(nbytes_of(profile) * whole, owners,
                                                        workers),
                                   own_counts, workers, counters,
                                   then_s=None if summing is not None else then_s)
    if summing is not None:
        line.wait(summing)
        seconds += then_s
    return seconds


def _compute_shares(line: Timeline, profile: Profile, *, split: Split, costs: np.ndarray,
                    speed: np.ndarray) -> None:
    """Every rank preconditions its rows of the split layers (costs: each layer's
    precondition_s at speed 1)."""
    shares = split_shares(profile, split, len(speed))
    line.compute("precondition", costs[sorted(split)] @ shares / speed, (shares > 0).sum(axis=0))


def _post_share_sum(line: Timeline, profile: Profile, *, network: Network | None,
                    split: Split, seconds: float, own_s: np.ndarray,
                    own_counts: np.ndarray) -> Segment:
    """Post the all-reduce of the split layers' shares (taking `seconds`) once the last rank
    has its shares, then each rank preconditions its own layers (own_s, own_counts): on the
    wire (costs.allreduce_wire_s) the all-reduce runs beside that compute; its hosts' part,
    the rest, shares the ranks' cores (with contention: Timeline.background) or else delays
    each rank still computing when it starts by that much. The all-reduce's segment."""
    segment = line.post("broadcast", seconds)
    nbytes = sum(profile.layers[i].grad_numel for i in split) * profile.dtype_bytes
    cpu_s = seconds - allreduce_wire_s(profile, nbytes=nbytes, collective_s=seconds,
                                       workers=len(line.t), network=network)
    if line.contention is not None:
        line.background("broadcast", cpu_s, start_s=segment.start_s)
    line.compute("precondition", own_s, own_counts)
    if line.contention is None:
        line.compute("broadcast", np.where(line.t > segment.start_s, cpu_s, 0.0))
    return segment


def nbytes_of(profile: Profile) -> np.ndarray:
    """Each layer's gradient bytes."""
    return np.asarray([l.grad_numel * profile.dtype_bytes for l in profile.layers], dtype=float)


def _split_decomposition_broadcasts(line: Timeline, profile: Profile, *, owners: Sequence[int],
                                    workers: int, net: Network, split: Split,
                                    posted: bool = False) -> tuple[Segment | None, float]:
    """At a decomposition update, one fused broadcast per owner of split layers: their
    decompositions plus its counters, waited for at once or, `posted`, posted (once the last
    rank gets there) for a later wait(); (the posted segment or None, seconds; 0 without split
    layers)."""
    if not split or workers == 1:
        return None, 0.0
    index = sorted(split)
    split_owners = [owners[i] for i in index]
    sizes = per_owner(np.asarray(decomposition_sizes(profile), dtype=float)[index],
                      split_owners, workers)
    owned = np.bincount(split_owners, minlength=workers)
    counters = NUMERICS_ELEMENTS * profile.dtype_bytes
    if not posted:
        return None, _broadcasts(line, net, sizes, owned, workers, counters)
    seconds = _group_s(net, sizes, owned, workers, counters)
    return line.post("broadcast", seconds), seconds


def _split_allreduce_s(profile: Profile, *, workers: int, net: Network, split: Split
                       ) -> float | None:
    """Seconds of the fused all-reduce (sum) of every rank's shares of the split layers'
    preconditioned gradients (None without split layers or at one worker: no such
    collective)."""
    if not split or workers == 1:
        return None
    nbytes = sum(profile.layers[i].grad_numel for i in split) * profile.dtype_bytes
    return net.allreduce_s(ranks=workers, nbytes=nbytes)


def _broadcasts(line: Timeline, net: Network, sizes: Sequence[float], owned: np.ndarray,
                workers: int, counters: int) -> float:
    """One fused broadcast per owner (its payload plus its counters), posted together and
    waited for; their seconds."""
    if workers == 1:
        return 0.0
    seconds = _group_s(net, sizes, owned, workers, counters)
    line.collective("broadcast", seconds, count=int((np.asarray(owned) > 0).sum()))
    return seconds


def _group_s(net: Network, sizes: Sequence[float], owned: np.ndarray, workers: int,
             counters: int) -> float:
    """Seconds of one fused broadcast per owner (payload `sizes` plus `counters` bytes) of
    those owning something, posted together."""
    return net.broadcast_group_s([net.broadcast_s(ranks=workers, nbytes=n + counters)
                                  for n, k in zip(sizes, owned) if k > 0])


def _ordered_broadcasts(line: Timeline, net: Network, sizes: Sequence[float],
                        owned: np.ndarray, workers: int, counters: int, *,
                        then_s: float | None = None) -> float:
    """The preconditioned gradients' broadcasts, one fused per owner (its payload plus its
    counters), in ascending owner rank, right after preconditioning, then (split layers) the
    all-reduce of their shares taking `then_s`, timed as broadcast; returns their seconds.

    Rank r posts owner o's broadcast before its own preconditioning when o < r, right after
    it otherwise, and a collective runs once every rank has posted it: owner o's may start at
    max(precondition end of ranks 0..o, precondition start of ranks above o). They run in that
    order on broadcast_overlap lanes (Network.broadcast_queue_end_s); the all-reduce, posted
    after them, starts when every rank has finished preconditioning and they are done. When
    the first may start only once every rank is done, that is Network.broadcast_group_s after
    the last rank. Without that all-reduce, the last owner goes on once the others'
    broadcasts have reached it and its own bytes are buffered (_receivers_end_s); every other
    rank receives until the end. A rank's comm seconds: its wait, at most that group's."""
    if workers == 1:
        return 0.0
    seconds = [net.broadcast_s(ranks=workers, nbytes=n + counters)
               for n, k in zip(sizes, owned) if k > 0]
    group_s = net.broadcast_group_s(seconds)
    ends = line.t.copy()
    starts = ends - line.last.get("precondition", np.zeros(workers))
    ranks = np.flatnonzero(np.asarray(owned) > 0)  # the owners, ascending
    # owner o may start once ranks 0..o have ended and ranks above o have started
    above = np.append(np.maximum.accumulate(starts[::-1])[::-1], -np.inf)
    arrivals = np.maximum(np.maximum.accumulate(ends)[ranks], above[ranks + 1]).tolist()
    if seconds and (arrivals[0] < ends.max() or then_s is None):
        end, k = net.broadcast_queue_end_s(arrivals, seconds)
        o = ranks[k]
        gate = int(np.argmax(np.concatenate([ends[:o + 1], starts[o + 1:]])))
        until = None if then_s is not None else _receivers_end_s(
            net, arrivals, seconds, end=end, last_root=int(ranks[-1]), ends=ends,
            root_bytes=sizes[int(ranks[-1])] + counters)
        line.wait(line.post_at("broadcast", start_s=arrivals[k], end_s=end, gate=gate,
                               count=len(seconds) - k), comm_max_s=group_s, until=until)
    elif seconds:
        line.collective("broadcast", group_s, count=len(seconds))
    if then_s is not None:
        line.collective("broadcast", then_s)
        group_s += then_s
    return group_s


def _receivers_end_s(net: Network, arrivals: Sequence[float], seconds: Sequence[float], *,
                     end: float, last_root: int, ends: np.ndarray, root_bytes: float
                     ) -> np.ndarray:
    """When each rank is done with the owners' ordered broadcasts (queue ending at `end`):
    every rank receives the last owner's, so it waits for the end, but the last owner
    itself only for the others' broadcasts and its own send of `root_bytes`
    (Network.broadcast_root_s, from its clock `ends`); a root returns once its bytes are
    buffered."""
    until = np.full(len(ends), end)
    received = (net.broadcast_queue_end_s(arrivals[:-1], seconds[:-1])[0]
                if len(seconds) > 1 else -np.inf)
    root_s = net.broadcast_root_s(ranks=len(ends), nbytes=root_bytes)
    until[last_root] = min(end, max(received, ends[last_root] + root_s))
    return until
