"""The gradient all-reduce in buckets (dpkfac.core.buckets): each bucket's seconds, the part of
them on the wire, and when a chain of bucket all-reduces posted as gradients become ready ends.

The executor posts bucket i's all-reduce (asynchronously) once its gradients are ready and
buckets 0..i-1 are posted; a collective runs once every rank has posted it, and the buckets
run one after another. A profile's `step.gradient_buckets` gives each bucket's bytes and the
seconds from the step's start at which it was ready; a profile without them is modelled as
today's one fused all-reduce of the whole model's gradient, ready at the end of
forward/backward. Seconds, bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dpkfac.core.profile import Profile
from planner.model.costs import (
    allreduce_wire_s,
    gradient_allreduce_cpu_s,
    gradient_allreduce_s,
    gradient_allreduce_wire_s,
    network_of,
)
from planner.model.network import Network


@dataclass(frozen=True)
class BucketCost:
    """One bucket's all-reduce: `ready` is when its gradients are ready, as a fraction (0..1)
    of the worker's forward/backward; `seconds` its whole time (its share of the packing plus
    the collective); `wire_s` of which on the wire (what compute can hide); `follow_s` its
    time when it starts as the bucket before it ends (less its share of what the chain saves,
    chained_fraction; default `seconds`)."""
    ready: float
    seconds: float
    wire_s: float
    follow_s: float | None = None

    @property
    def chained_s(self) -> float:
        """Seconds when it follows the bucket before it back to back."""
        return self.seconds if self.follow_s is None else self.follow_s


def chained_seconds(buckets: Sequence[BucketCost]) -> float:
    """Seconds of the buckets' all-reduces run back to back (the first alone, the others each
    following the one before)."""
    return buckets[0].seconds + sum(b.chained_s for b in buckets[1:]) if buckets else 0.0


def chained_fraction(profile: Profile) -> float:
    """The fraction of its buckets' lone all-reduce seconds that the step's bucket chain takes
    when posted back to back, as the profile measured it at its world size: comm.
    gradient_buckets_s over the sum of the same buckets' lone times on its own collective
    curve, at most 1 (1 without that measurement or with one bucket). A call queued behind
    another skips part of the latency a lone call pays after compute (the collective threads
    waking, the ranks' arrivals)."""
    comm, buckets = profile.comm, profile.gradient_buckets
    if comm.gradient_buckets_s is None or len(buckets) < 2 or comm.world_size < 2:
        return 1.0
    alone = lone_buckets_s(profile)
    return min(comm.gradient_buckets_s / alone, 1.0) if alone > 0 else 1.0


def lone_buckets_s(profile: Profile) -> float:
    """Seconds of the profile's gradient buckets' all-reduces each alone, on its own
    collective curve at its world size."""
    own = network_of(profile)
    return sum(own.allreduce_s(ranks=profile.comm.world_size, nbytes=b.bytes)
               for b in profile.gradient_buckets)


def bucket_costs(profile: Profile, *, workers: int, network: Network | None = None
                 ) -> tuple[BucketCost, ...]:
    """The gradient all-reduce's buckets in posting order at `workers` ranks. Without
    profile.gradient_buckets: one bucket, ready at the end of forward/backward, of
    costs.gradient_allreduce_s with costs.gradient_allreduce_wire_s on the wire. With them:
    bucket i moves its bytes b_i (the loss element is not timed, as in the fused figure) and
    pays pack_s * b_i / sum(b) of the packing; its ready time is ready_s over forward/backward
    with the buckets posted from it (Profile.forward_backward_posting_s; at most 1)."""
    if not profile.gradient_buckets:
        return (BucketCost(ready=1.0,
                           seconds=gradient_allreduce_s(profile, workers=workers,
                                                        network=network),
                           wire_s=gradient_allreduce_wire_s(profile, workers=workers,
                                                            network=network)),)
    net = network_of(profile, network)
    buckets = profile.gradient_buckets
    total = sum(b.bytes for b in buckets)
    fb = profile.forward_backward_posting_s(True)
    collectives = [net.allreduce_s(ranks=workers, nbytes=b.bytes) for b in buckets]
    # what the chain saves against lone calls, shared by the buckets that follow another
    saving = (1.0 - chained_fraction(profile)) * sum(collectives) / max(len(buckets) - 1, 1)
    out = []
    for i, (b, collective) in enumerate(zip(buckets, collectives)):
        pack = profile.pack_s * (b.bytes / total if total > 0 else 1 / len(buckets))
        wire = allreduce_wire_s(profile, nbytes=b.bytes, collective_s=collective,
                                workers=workers, network=network)
        out.append(BucketCost(
            ready=min(b.ready_s / fb, 1.0) if fb > 0 else 1.0, seconds=pack + collective,
            wire_s=wire, follow_s=max(pack + collective - saving, pack + wire) if i else None))
    return tuple(out)


def buckets_cpu_s(profile: Profile, buckets: Sequence[BucketCost], *, workers: int,
                  network: Network | None = None) -> float:
    """Of the buckets' seconds, what an overlapped step's all-reduces take from the host's
    cores after forward/backward: what is not on the wire, at most the all-reduce's CPU
    seconds when the profile measured them (costs.gradient_allreduce_cpu_s's rule; without
    profile buckets exactly that figure)."""
    if not profile.gradient_buckets:
        return gradient_allreduce_cpu_s(profile, workers=workers, network=network)
    rest = chained_seconds(buckets) - sum(b.wire_s for b in buckets)
    cpu = profile.comm.gradient_allreduce_cpu_s
    return rest if cpu is None else min(cpu, rest)


@dataclass(frozen=True)
class Chain:
    """When a chain of bucket all-reduces ends (`end_s`) and its last unbroken run: from bucket
    `first` on, every bucket started as the one before ended; bucket `first` started at
    `start_s`, when its last worker had it ready."""
    end_s: float
    first: int
    start_s: float


def bucket_chain(ready_s: Sequence[float], seconds: Sequence[float],
                 follow_s: Sequence[float] | None = None) -> Chain:
    """Bucket i (ready on every worker at ready_s[i]) starts at max(ready_s[i], end of bucket
    i-1) and takes seconds[i], or follow_s[i] when it starts as bucket i-1 ends (default
    seconds). At least one bucket."""
    follow = seconds if follow_s is None else follow_s
    end, first, start = float("-inf"), 0, 0.0
    for i, (ready, d) in enumerate(zip(ready_s, seconds)):
        if ready >= end:
            first, start, end = i, float(ready), float(ready) + d
        else:
            end = end + follow[i]
    return Chain(end_s=end, first=first, start_s=start)
