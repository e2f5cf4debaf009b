"""Per-layer and per-worker costs that the step model and the solvers share.

Times in seconds per step, at speed 1, amortised over the update frequencies where said; sizes
in bytes. The step's structure and byte formulas are dpkfac.core.step's; the event-level
timeline that turns these costs into a step time is planner.model.simulate's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dpkfac.core import step as core_step
from dpkfac.core.errors import InputError
from dpkfac.core.profile import LayerCost, Profile
from dpkfac.core.strategy import FactorMode, SharedResult, Strategy
from planner.model.network import Network, network_from_profile
from planner.solve.bounds import makespan_lower_bound_s


@dataclass(frozen=True)
class PlanConfig:
    """Planning settings that change costs: K-FAC refresh periods, in steps, and whether the
    executor overlaps an owner's local work with the gradient all-reduce (`dpkfac train`'s
    default; `--no-overlap` runs the serial step)."""
    factor_update_freq: int = 1
    inv_update_freq: int = 1
    overlap: bool = True

    def __post_init__(self) -> None:
        for name in ("factor_update_freq", "inv_update_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


def layer_work_s(layer: LayerCost, *, config: PlanConfig) -> float:
    """Seconds per step an owner spends on `layer` under DP-KFAC at speed 1: factors every
    factor_update_freq steps, decompositions every inv_update_freq, preconditioning every step."""
    return (layer.factor_s / config.factor_update_freq
            + layer.decompose_s / config.inv_update_freq
            + layer.precondition_s)


def layer_works_s(profile: Profile, *, config: PlanConfig) -> tuple[float, ...]:
    """layer_work_s of every layer, in profile order."""
    return tuple(layer_work_s(layer, config=config) for layer in profile.layers)


def layer_state_bytes(profile: Profile) -> tuple[int, ...]:
    """Bytes of second-order state each layer's owner holds under DP-KFAC (state_bytes)."""
    return tuple(layer.state_bytes for layer in profile.layers)


def per_owner(values: Sequence[float], owners: Sequence[int], workers: int) -> np.ndarray:
    """Sum of `values` per owner rank (floats, indexed by rank)."""
    return np.bincount(np.asarray(owners, dtype=int), weights=np.asarray(values, dtype=float),
                       minlength=workers)


def grad_bytes(layer: LayerCost, *, profile: Profile) -> int:
    """Bytes of a layer's (preconditioned) gradient."""
    return layer.grad_numel * profile.dtype_bytes


def factor_bytes(layer: LayerCost, *, dtype_bytes: int) -> int:
    """Bytes of a layer's two Kronecker factors A (dim_a^2) and G (dim_g^2)."""
    return dtype_bytes * core_step.factor_numel(layer.dim_a, layer.dim_g)


def decomposition_bytes(layer: LayerCost, *, dtype_bytes: int, compute_method: str) -> int:
    """Bytes of a layer's decompositions: eigen dim^2 + dim per factor, inverse dim^2."""
    return dtype_bytes * core_step.decomposition_numel(layer.dim_a, layer.dim_g, compute_method)


def decomposition_sizes(profile: Profile) -> list[int]:
    """decomposition_bytes of every layer, in profile order."""
    return [decomposition_bytes(layer, dtype_bytes=profile.dtype_bytes,
                                compute_method=profile.compute_method)
            for layer in profile.layers]


def network_of(profile: Profile, network: Network | None = None) -> Network:
    """`network` if given (e.g. from a cluster file), else the one the profile measured."""
    return network if network is not None else network_from_profile(profile.comm)


def gradient_allreduce_s(profile: Profile, *, workers: int, network: Network | None = None
                         ) -> float:
    """Seconds of the gradient all-reduce at `workers` ranks: the local packing of the gradients
    into one buffer and back (profile.pack_s, paid even at one rank) plus the ring all-reduce
    of the whole model's gradient."""
    return profile.pack_s + network_of(profile, network).allreduce_s(
        ranks=workers, nbytes=profile.model_grad_bytes)


def gradient_allreduce_wire_s(profile: Profile, *, workers: int,
                              network: Network | None = None) -> float:
    """Of gradient_allreduce_s, the seconds on the wire: what an overlapped step can hide
    behind compute. The rest (packing, the hosts' copies, reductions and wake-ups) needs the
    CPU the compute uses. With a cluster file's network, the bandwidth term of the ring
    all-reduce; with a profile that knows its links' rate (`profile --link-rate`), the bytes
    each rank sends / that rate (at most the all-reduce's time); otherwise 0 (a profile that
    cannot tell its links from its hosts hides nothing)."""
    if workers == 1:
        return 0.0
    total = gradient_allreduce_s(profile, workers=workers, network=network) - profile.pack_s
    if network is not None and network.source == "cluster":
        hop = network.allreduce_hop
        return min(2 * (workers - 1) / workers * profile.model_grad_bytes * hop.beta_s_per_byte,
                   total)
    link = profile.comm.link_bytes_per_s
    if network is not None or link is None:
        return 0.0
    return min(2 * (workers - 1) / workers * profile.model_grad_bytes / link, total)


def gradient_allreduce_cpu_s(profile: Profile, *, workers: int,
                             network: Network | None = None) -> float:
    """Of gradient_allreduce_s, the seconds an overlapped step's all-reduce takes from its
    host's cores: what is not on the wire (gradient_allreduce_wire_s), or, with ranks sharing
    a host (profile.contention at this world size) and the all-reduce's CPU seconds measured,
    at most those (the rest is waiting: wake-ups, latency)."""
    rest = (gradient_allreduce_s(profile, workers=workers, network=network)
            - gradient_allreduce_wire_s(profile, workers=workers, network=network))
    cpu = profile.comm.gradient_allreduce_cpu_s
    if cpu is None or profile.contention is None or not profile.contention.applies(workers):
        return rest
    return min(cpu, rest)


def common_memory_bytes(profile: Profile, *, workers: int) -> int:
    """Bytes every worker holds for DP-KFAC whatever it owns: the flat buffers of the fused
    broadcasts (one per owner, together all K-FAC layers' gradient bytes); 0 at one worker."""
    return profile.grad_bytes if workers > 1 else 0


def traffic_by_kind(profile: Profile, *, strategy: Strategy | None, owners: Sequence[int],
                    workers: int, config: PlanConfig) -> dict[str, float]:
    """Bytes one rank sends plus receives per step, by dpkfac.core.step.TRAFFIC_KINDS kind
    (strategy None: plain SGD), exactly as the executor counts them."""
    return core_step.traffic_by_kind(
        strategy=strategy, workers=workers, dtype_bytes=profile.dtype_bytes,
        model_grad_numel=profile.model_grad_bytes // profile.dtype_bytes,
        layer_dims=[(layer.dim_a, layer.dim_g) for layer in profile.layers],
        grad_numel=sum(layer.grad_numel for layer in profile.layers),
        owners=len(set(owners)), compute_method=profile.compute_method,
        factor_update_freq=config.factor_update_freq, inv_update_freq=config.inv_update_freq)


def state_bytes_per_worker(profile: Profile, *, strategy: Strategy | None,
                           owners: Sequence[int], workers: int) -> tuple[int, ...]:
    """Bytes of second-order state each rank holds: LOCAL factors, the owned layers' state;
    ALLREDUCED, all factors plus the owned decompositions (PRECONDITIONED_GRADIENT) or all of
    them (DECOMPOSITION). None (SGD): nothing."""
    if strategy is None:
        return (0,) * workers
    if strategy.factors is FactorMode.LOCAL:
        return tuple(int(v) for v in per_owner(layer_state_bytes(profile), owners, workers))
    all_factors = sum(factor_bytes(l, dtype_bytes=profile.dtype_bytes) for l in profile.layers)
    decomps = decomposition_sizes(profile)
    if strategy.shared is SharedResult.DECOMPOSITION:
        return (all_factors + sum(decomps),) * workers
    return tuple(int(all_factors + d) for d in per_owner(decomps, owners, workers))


def broadcast_lower_bound_s(profile: Profile, *, workers: int,
                            network: Network | None = None) -> float:
    """A proven lower bound on the seconds of one step's preconditioned-gradient broadcasts over
    all placements: one broadcast of every layer's gradient (Network.broadcasts_floor_s)."""
    return network_of(profile, network).broadcasts_floor_s(ranks=workers,
                                                           total_bytes=profile.grad_bytes)


def second_order_lower_bound_s(profile: Profile, *, workers: int, config: PlanConfig,
                               speeds: Sequence[float] | None = None,
                               compute_bound_s: float = 0.0,
                               network: Network | None = None) -> float:
    """A proven lower bound on DP-KFAC's amortised second-order seconds for any placement:
    max(total work / sum of speeds, pigeonhole bound, compute_bound_s) + the broadcast bound.
    `compute_bound_s` lets a solver's proven bound (e.g. an ILP dual bound) tighten it. With
    the overlapped step (config.overlap, more than one worker) the gradient all-reduce may hide
    up to its wire seconds of that compute (second-order time counts from its end), plus the
    head start the fastest worker's forward/backward gives it over the slowest's. With
    contention (ranks sharing a host), compute runs at best at a lone worker's speed."""
    works = layer_works_s(profile, config=config)
    compute = max(makespan_lower_bound_s(work=works, workers=workers, speeds=speeds),
                  compute_bound_s)
    if profile.contention is not None and profile.contention.applies(workers):
        compute *= profile.contention.time_factor(1)  # a worker computing alone, at best
    if config.overlap and workers > 1:  # a fast worker starts its local work earlier still
        fastest, slowest = (max(speeds), min(speeds)) if speeds else (1.0, 1.0)
        hidden = (gradient_allreduce_wire_s(profile, workers=workers, network=network)
                  + profile.forward_backward_s * (1 / slowest - 1 / fastest))
        compute = max(compute - hidden, 0.0)
    return compute + broadcast_lower_bound_s(profile, workers=workers, network=network)
