"""Predicted time, memory and traffic of one DP-KFAC training step under a given placement.

The model of a step (all times in seconds, sizes in bytes, per step, amortised over the update
frequencies):

* each owner's work per layer: (factor_a_s + factor_g_s) / factor_update_freq
  + (decompose_a_s + decompose_g_s) / inv_update_freq + precondition_s;
  a worker's compute is the sum over its layers divided by its speed (default 1.0);
* the executor fuses all of one owner's preconditioned gradients into ONE broadcast, so the
  broadcast time is the sum over owners with at least one layer of a broadcast of that owner's
  bytes (grad_numel * dtype bytes summed over its layers), rescaled to p ranks (planner.comm);
* second_order_s = max over workers of compute + total broadcast time (the broadcasts start once
  the slowest owner is done);
* step_time_s = forward_backward_s + gradient all-reduce of model_grad_bytes + second_order_s
  + optimizer_s.

Collective costs come from the profile's measurements or, with a cluster file, from its
topology (a planner.comm.Network). These closed forms are the amortised view the solvers
optimise; planner.simulate gives the step-by-step prediction that placement files carry (equal
to these at both update frequencies 1 on identical workers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import comm
from .errors import InputError
from .profile import LayerCost, Profile
from .solvers import makespan_lower_bound_s, memory_loads, worker_loads_s


@dataclass(frozen=True)
class PlanConfig:
    """Planning settings that change costs: K-FAC refresh periods, in steps."""
    factor_update_freq: int = 1
    inv_update_freq: int = 1

    def __post_init__(self) -> None:
        for name in ("factor_update_freq", "inv_update_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Prediction:
    """Predicted costs of one step under one placement. Seconds, bytes; per-worker tuples by rank.

    compute_s: each worker's second-order compute (its layers' work / its speed).
    memory_bytes: each worker's second-order state (state_bytes of its layers).
    comm_bytes: bytes each worker moves per step (gradient all-reduce + broadcasts), see
    comm_bytes_per_worker.
    lower_bound_s: a proven lower bound on second_order_s for this profile and worker count.
    """
    workers: int
    step_time_s: float
    second_order_s: float
    lower_bound_s: float
    allreduce_s: float
    broadcast_s: float
    compute_makespan_s: float
    compute_s: tuple[float, ...]
    memory_bytes: tuple[int, ...]
    comm_bytes: tuple[int, ...]
    layers_owned: tuple[int, ...]
    broadcast_bytes: tuple[int, ...]


def layer_work_s(layer: LayerCost, *, config: PlanConfig) -> float:
    """Seconds per step the owner spends on `layer` at speed 1, amortised over the frequencies."""
    return (layer.factor_s / config.factor_update_freq
            + layer.decompose_s / config.inv_update_freq
            + layer.precondition_s)


def layer_works_s(profile: Profile, *, config: PlanConfig) -> tuple[float, ...]:
    """layer_work_s of every layer, in profile order."""
    return tuple(layer_work_s(layer, config=config) for layer in profile.layers)


def layer_grad_bytes(profile: Profile) -> tuple[int, ...]:
    """Bytes of each layer's (preconditioned) gradient: grad_numel * dtype bytes."""
    return tuple(layer.grad_numel * profile.dtype_bytes for layer in profile.layers)


def layer_state_bytes(profile: Profile) -> tuple[int, ...]:
    """Bytes of second-order state each layer's owner holds (the profile's state_bytes)."""
    return tuple(layer.state_bytes for layer in profile.layers)


def owner_broadcast_bytes(profile: Profile, *, owners: Sequence[int], workers: int
                          ) -> tuple[int, ...]:
    """Bytes each rank broadcasts per step: the fused gradients of the layers it owns."""
    return memory_loads(memory=layer_grad_bytes(profile), owners=owners, workers=workers)


def network_of(profile: Profile, network: comm.Network | None = None) -> comm.Network:
    """`network` if given (e.g. from a cluster file), else the one the profile measured."""
    return network if network is not None else comm.network_from_profile(profile.comm)


def gradient_allreduce_s(profile: Profile, *, workers: int,
                         network: comm.Network | None = None) -> float:
    """Seconds of the executor's gradient all-reduce at `workers` ranks: the local packing of
    the gradients into one buffer and back (profile.pack_s, paid even at one rank) plus the ring
    all-reduce of the whole model's gradient."""
    return profile.pack_s + network_of(profile, network).allreduce_s(
        ranks=workers, nbytes=profile.model_grad_bytes)


def common_memory_bytes(profile: Profile, *, workers: int) -> int:
    """Bytes every worker holds for DP-KFAC whatever it owns: the flat buffers of the fused
    broadcasts (one per owner, together all K-FAC layers' gradient bytes); 0 at one worker."""
    return profile.grad_bytes if workers > 1 else 0


def owner_broadcasts_s(profile: Profile, *, owners: Sequence[int], workers: int,
                       network: comm.Network | None = None) -> tuple[float, ...]:
    """Seconds of each rank's fused broadcast (0 for a rank that owns nothing)."""
    net = network_of(profile, network)
    owned = [0] * workers
    for owner in owners:
        owned[owner] += 1
    sizes = owner_broadcast_bytes(profile, owners=owners, workers=workers)
    return tuple(net.broadcast_s(ranks=workers, nbytes=nbytes) if count > 0 else 0.0
                 for nbytes, count in zip(sizes, owned))


def broadcast_total_s(profile: Profile, *, owners: Sequence[int], workers: int,
                      network: comm.Network | None = None) -> float:
    """Seconds of all broadcasts of one step: one fused broadcast per owner with >= 1 layer,
    posted together (comm.Network.broadcast_group_s)."""
    return network_of(profile, network).broadcast_group_s(
        owner_broadcasts_s(profile, owners=owners, workers=workers, network=network))


def broadcast_lower_bound_s(profile: Profile, *, workers: int,
                            network: comm.Network | None = None) -> float:
    """A proven lower bound on broadcast_total_s over all placements, seconds.

    Any placement makes k >= 1 fused broadcasts whose bytes add up to all layers' gradient bytes
    N, costing k (p-1) alpha' + N beta' >= (p-1) alpha' + N beta': the cost of one broadcast of
    everything. It holds because the per-byte term is additive and alpha' >= 0. With measured
    points the bound is weaker (comm.Network.broadcasts_floor_s).
    """
    return network_of(profile, network).broadcasts_floor_s(ranks=workers,
                                                           total_bytes=profile.grad_bytes)


def second_order_lower_bound_s(profile: Profile, *, workers: int, config: PlanConfig,
                               speeds: Sequence[float] | None = None,
                               compute_bound_s: float = 0.0,
                               network: comm.Network | None = None) -> float:
    """A proven lower bound on second_order_s for any placement, seconds.

    max(total work / sum of speeds, largest layer work / fastest speed, compute_bound_s)
    + broadcast_lower_bound_s. `compute_bound_s` lets a solver's proven bound on the compute
    makespan (e.g. an ILP dual bound) tighten the first term.
    """
    works = layer_works_s(profile, config=config)
    compute = max(makespan_lower_bound_s(work=works, workers=workers, speeds=speeds),
                  compute_bound_s)
    return compute + broadcast_lower_bound_s(profile, workers=workers, network=network)


def comm_bytes_per_worker(profile: Profile, *, owners: Sequence[int], workers: int
                          ) -> tuple[int, ...]:
    """Bytes each worker sends plus receives per step (0 at one worker).

    Counted simply: the gradient all-reduce moves 2 (p-1)/p * model_grad_bytes per rank (a ring's
    per-rank send volume); in the broadcasts a rank counts the bytes it sends for the layers it
    owns and the bytes it receives for all other layers, so every rank counts all layers'
    gradient bytes once.
    """
    if workers == 1:
        return (0,)
    ring = comm.ring_allreduce_bytes(ranks=workers, nbytes=profile.model_grad_bytes)
    sent = owner_broadcast_bytes(profile, owners=owners, workers=workers)
    total = profile.grad_bytes
    return tuple(int(round(ring + own + (total - own))) for own in sent)


def predict(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
            speeds: Sequence[float] | None = None, compute_bound_s: float = 0.0,
            network: comm.Network | None = None) -> Prediction:
    """Predicted step of `profile` with layer i owned by rank owners[i] among `workers` ranks."""
    if len(owners) != len(profile.layers):
        raise ValueError(f"{len(owners)} owners for {len(profile.layers)} layers")
    if any(not 0 <= o < workers for o in owners):
        raise ValueError(f"owner rank out of range 0..{workers - 1}")
    works = layer_works_s(profile, config=config)
    compute = worker_loads_s(work=works, owners=owners, workers=workers, speeds=speeds)
    makespan = max(compute, default=0.0)
    broadcast = broadcast_total_s(profile, owners=owners, workers=workers, network=network)
    allreduce = gradient_allreduce_s(profile, workers=workers, network=network)
    second_order = makespan + broadcast
    owned = [0] * workers
    for owner in owners:
        owned[owner] += 1
    bound = second_order_lower_bound_s(profile, workers=workers, config=config, speeds=speeds,
                                       compute_bound_s=compute_bound_s, network=network)
    return Prediction(
        workers=workers,
        step_time_s=(profile.forward_backward_s + allreduce + second_order + profile.apply_s
                     + profile.optimizer_s),
        second_order_s=second_order,
        lower_bound_s=min(bound, second_order),
        allreduce_s=allreduce,
        broadcast_s=broadcast,
        compute_makespan_s=makespan,
        compute_s=compute,
        memory_bytes=memory_loads(memory=layer_state_bytes(profile), owners=owners,
                                  workers=workers),
        comm_bytes=comm_bytes_per_worker(profile, owners=owners, workers=workers),
        layers_owned=tuple(owned),
        broadcast_bytes=owner_broadcast_bytes(profile, owners=owners, workers=workers),
    )
