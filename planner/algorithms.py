"""Predicted per-step costs of DP-KFAC and the algorithms it is compared with.

One model for every distributed K-FAC strategy (planner/strategy.py: factors LOCAL or
ALLREDUCED, owners share the PRECONDITIONED_GRADIENT or the DECOMPOSITION), on the same profile,
alpha-beta network and event simulator as the planner; per step, amortised over the update
frequencies; seconds and bytes; identical workers (speed 1).

Traffic (bytes a rank SENDS PLUS RECEIVES per step, exactly what the executor counts):
* gradient_allreduce: ring all-reduce, 4 (p-1)/p n, of the model's gradient plus the loss
  (LOSS_ELEMENTS element rides in the same buffer, executor/train.py);
* factor_allreduce (ALLREDUCED): ring all-reduce of every layer's A and G (dim_a^2 + dim_g^2
  elements each, one fused call) every factor_update_freq steps;
* preconditioned_gradient_broadcast (PRECONDITIONED_GRADIENT): one fused broadcast per owner,
  every step: every rank counts every layer's gradient bytes once (sent or received);
* decomposition_broadcast (DECOMPOSITION): one fused broadcast per owner of its layers'
  decompositions (eigen dim^2 + dim per factor, inverse dim^2) every inv_update_freq steps;
* numerics_counters: NUMERICS_ELEMENTS elements at the end of each owner's broadcast.
At one worker nothing moves. Ring byte counts are rounded per call as the executor rounds them.

Second-order state per worker: LOCAL: the profile's state_bytes of its own layers; ALLREDUCED:
all factors, plus its own decompositions (PRECONDITIONED_GRADIENT) or all of them
(DECOMPOSITION). memory_bytes_per_worker adds the model's gradient (model_grad_bytes) to the
busiest worker's state.

Time: dp-kfac variants are simulated (planner.simulate, mean over a cycle, as placement files
carry it). mpd-kfac / kaisa-mem-opt are simulated too, on the profile with factor construction
removed from the owners and the replicated part (every worker builds all factors, then the
factor all-reduce; amortised) added before the step's collectives, which is the same on every
worker. kaisa-comm-opt uses the closed form: replicated factors + (slowest owner's
decompositions + the decomposition broadcasts) / inv_update_freq + every layer's
preconditioning on every worker.

Owners: mpd-kfac spreads decompositions by longest-processing-time on their measured times;
KAISA by LPT on its d^3 estimate (dim_a^3 + dim_g^3); dp-kfac-round-robin in layer order (the
seed's code); dp-kfac as planned. Any of them can be given owners instead (e.g. the owners a
training run used).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from . import comm
from .comm import Network
from .costmodel import PlanConfig, gradient_allreduce_s, network_of
from .profile import LayerCost, Profile
from .simulate import simulate_cycle
from .solvers import solve
from .strategy import (NUMERICS_ELEMENTS, STRATEGY_OF, FactorMode, SharedResult, Strategy)

ALGORITHMS = ("sgd", "mpd-kfac", "kaisa-comm-opt", "kaisa-mem-opt", "dp-kfac-round-robin",
              "dp-kfac")
TRAFFIC_KINDS = ("gradient_allreduce", "factor_allreduce", "decomposition_broadcast",
                 "preconditioned_gradient_broadcast", "numerics_counters")
LOSS_ELEMENTS = 1  # the loss value rides in the gradient all-reduce (executor/train.py)


@dataclass(frozen=True)
class AlgorithmCost:
    """One algorithm's predicted step at one worker count. Seconds; bytes per worker.

    second_order_compute_s: the busiest worker's K-FAC compute per step (factors, decompositions,
    preconditioning; amortised). second_order_memory_bytes: the busiest worker's second-order
    state. comm_bytes_by_kind: traffic per TRAFFIC_KINDS kind (sums to comm_bytes_per_step).
    """
    workers: int
    algorithm: str
    step_time_s: float
    second_order_s: float
    comm_bytes_per_step: int
    memory_bytes_per_worker: int
    second_order_compute_s: float = 0.0
    second_order_memory_bytes: int = 0
    comm_bytes_by_kind: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        """The what-if row (CONTRACTS.md keys first, then the breakdown) as a plain dict."""
        row = dataclasses.asdict(self)
        kinds = row.pop("comm_bytes_by_kind")
        row.update({f"comm_{kind}_bytes": kinds.get(kind, 0) for kind in TRAFFIC_KINDS})
        return row


# ----------------------------------------------------------------------------- sizes

def factor_bytes(layer: LayerCost, *, dtype_bytes: int) -> int:
    """Bytes of a layer's two Kronecker factors A (dim_a^2) and G (dim_g^2)."""
    return dtype_bytes * (layer.dim_a ** 2 + layer.dim_g ** 2)


def decomposition_bytes(layer: LayerCost, *, dtype_bytes: int, compute_method: str) -> int:
    """Bytes of a layer's decompositions: eigen dim^2 + dim per factor, inverse dim^2."""
    extra = 1 if compute_method == "eigen" else 0
    return dtype_bytes * sum(d * d + extra * d for d in (layer.dim_a, layer.dim_g))


def _decomposition_sizes(profile: Profile) -> list[int]:
    return [decomposition_bytes(l, dtype_bytes=profile.dtype_bytes,
                                compute_method=profile.compute_method) for l in profile.layers]


def _per_owner(values: Sequence[float], owners: Sequence[int], workers: int) -> list[float]:
    """Sum of `values` per owner rank."""
    totals = [0.0] * workers
    for value, owner in zip(values, owners):
        totals[owner] += value
    return totals


def _ring(nbytes: int, workers: int) -> int:
    """Ring all-reduce bytes of one call, rounded as the executor rounds them."""
    return int(round(comm.ring_allreduce_bytes(ranks=workers, nbytes=nbytes)))


# ----------------------------------------------------------------------------- traffic

def traffic_by_kind(profile: Profile, *, strategy: Strategy | None, owners: Sequence[int],
                    workers: int, config: PlanConfig) -> dict[str, float]:
    """Bytes one rank sends plus receives per step, by TRAFFIC_KINDS kind (sgd: strategy None).

    The same on every rank. Amortised kinds are per-call bytes / update frequency."""
    kinds = dict.fromkeys(TRAFFIC_KINDS, 0.0)
    if workers == 1:
        return kinds
    dtype = profile.dtype_bytes
    kinds["gradient_allreduce"] = _ring(profile.model_grad_bytes + LOSS_ELEMENTS * dtype, workers)
    if strategy is None:
        return kinds
    owner_count = len(set(owners))
    counters = owner_count * NUMERICS_ELEMENTS * dtype
    if strategy.factors is FactorMode.ALLREDUCED:
        all_factors = sum(factor_bytes(l, dtype_bytes=dtype) for l in profile.layers)
        kinds["factor_allreduce"] = _ring(all_factors, workers) / config.factor_update_freq
    if strategy.shared is SharedResult.PRECONDITIONED_GRADIENT:
        kinds["preconditioned_gradient_broadcast"] = float(profile.grad_bytes)
        kinds["numerics_counters"] = float(counters)
    else:
        kinds["decomposition_broadcast"] = sum(_decomposition_sizes(profile)) / config.inv_update_freq
        kinds["numerics_counters"] = counters / config.inv_update_freq
    return kinds


# ----------------------------------------------------------------------------- memory

def state_bytes_per_worker(profile: Profile, *, strategy: Strategy, owners: Sequence[int],
                           workers: int) -> tuple[int, ...]:
    """Bytes of second-order state each rank holds under `strategy`."""
    if strategy.factors is FactorMode.LOCAL:
        return tuple(int(v) for v in _per_owner([l.state_bytes for l in profile.layers],
                                                owners, workers))
    all_factors = sum(factor_bytes(l, dtype_bytes=profile.dtype_bytes) for l in profile.layers)
    decomps = _decomposition_sizes(profile)
    if strategy.shared is SharedResult.DECOMPOSITION:
        return (all_factors + sum(decomps),) * workers
    return tuple(int(all_factors + d) for d in _per_owner(decomps, owners, workers))


# ----------------------------------------------------------------------------- compute

def compute_per_worker_s(profile: Profile, *, strategy: Strategy, owners: Sequence[int],
                         workers: int, config: PlanConfig) -> tuple[float, ...]:
    """Seconds of K-FAC compute per step on each rank (amortised; collectives excluded)."""
    layers = profile.layers
    decompose = _per_owner([l.decompose_s / config.inv_update_freq for l in layers], owners,
                           workers)
    if strategy.factors is FactorMode.LOCAL:
        factors = _per_owner([l.factor_s / config.factor_update_freq for l in layers], owners,
                             workers)
    else:
        factors = [sum(l.factor_s for l in layers) / config.factor_update_freq] * workers
    if strategy.shared is SharedResult.DECOMPOSITION:
        precondition = [sum(l.precondition_s for l in layers)] * workers
    else:
        precondition = _per_owner([l.precondition_s for l in layers], owners, workers)
    return tuple(f + d + p for f, d, p in zip(factors, decompose, precondition))


# ----------------------------------------------------------------------------- time

def _replicated_factor_s(profile: Profile, *, workers: int, config: PlanConfig,
                         network: Network | None) -> float:
    """Every worker builds all factors, then one fused all-reduce of them; per step, seconds."""
    build = sum(l.factor_s for l in profile.layers)
    all_factors = sum(factor_bytes(l, dtype_bytes=profile.dtype_bytes) for l in profile.layers)
    reduce = network_of(profile, network).allreduce_s(ranks=workers, nbytes=all_factors)
    return (build + reduce) / config.factor_update_freq


def _simulated(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
               network: Network | None, prefix_s: float = 0.0) -> tuple[float, float]:
    """(mean step, mean second-order) seconds of the planner's simulation; `prefix_s` is work
    every worker does alike before the gradient all-reduce (added to forward/backward)."""
    if prefix_s:
        profile = dataclasses.replace(profile,
                                      forward_backward_s=profile.forward_backward_s + prefix_s)
    cycle = simulate_cycle(profile, owners=owners, workers=workers, config=config,
                           network=network)
    return cycle.mean_step_time_s, cycle.mean_second_order_s + prefix_s


def _without_factor_work(profile: Profile) -> Profile:
    zeroed = tuple(dataclasses.replace(l, factor_a_s=0.0, factor_g_s=0.0) for l in profile.layers)
    return dataclasses.replace(profile, layers=zeroed)


def _comm_opt_times(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
                    network: Network | None) -> tuple[float, float]:
    """(step, second-order) seconds of KAISA COMM-OPT, closed form (see the module docstring)."""
    net = network_of(profile, network)
    decompose = _per_owner([l.decompose_s for l in profile.layers], owners, workers)
    sizes = _per_owner(_decomposition_sizes(profile), owners, workers)
    broadcasts = sum(net.broadcast_s(ranks=workers, nbytes=n)
                     for rank, n in enumerate(sizes) if rank in set(owners))
    second_order = (_replicated_factor_s(profile, workers=workers, config=config, network=network)
                    + (max(decompose) + broadcasts) / config.inv_update_freq
                    + sum(l.precondition_s for l in profile.layers))
    step = (profile.forward_backward_s + gradient_allreduce_s(profile, workers=workers,
                                                              network=network)
            + second_order + profile.apply_s + profile.optimizer_s)
    return step, second_order


def kfac_times(profile: Profile, *, strategy: Strategy, owners: Sequence[int], workers: int,
               config: PlanConfig, network: Network | None = None) -> tuple[float, float]:
    """(step, second-order) seconds per step of `strategy` with layer i owned by owners[i]."""
    if strategy.shared is SharedResult.DECOMPOSITION:
        return _comm_opt_times(profile, owners=owners, workers=workers, config=config,
                               network=network)
    if strategy.factors is FactorMode.LOCAL:
        return _simulated(profile, owners=owners, workers=workers, config=config, network=network)
    prefix = _replicated_factor_s(profile, workers=workers, config=config, network=network)
    return _simulated(_without_factor_work(profile), owners=owners, workers=workers,
                      config=config, network=network, prefix_s=prefix)


# ----------------------------------------------------------------------------- owners

def default_owners(profile: Profile, *, algorithm: str, workers: int,
                   config: PlanConfig) -> tuple[int, ...]:
    """The owners an algorithm picks by itself (dp-kfac: the planner's best placement)."""
    if algorithm == "mpd-kfac":
        return solve("greedy", work=[l.decompose_s for l in profile.layers], workers=workers).owners
    if algorithm.startswith("kaisa"):
        return kaisa_owners(profile, workers=workers)
    from .costmodel import layer_works_s

    works = layer_works_s(profile, config=config)
    method = "round-robin" if algorithm == "dp-kfac-round-robin" else "best"
    return solve(method, work=works, workers=workers, time_limit_s=1.0).owners


def kaisa_owners(profile: Profile, *, workers: int) -> tuple[int, ...]:
    """KAISA's assignment: greedy LPT on the estimated decomposition cost dim_a^3 + dim_g^3."""
    return solve("greedy", work=[float(l.dim_a ** 3 + l.dim_g ** 3) for l in profile.layers],
                 workers=workers).owners


# ----------------------------------------------------------------------------- costs

def sgd_cost(profile: Profile, *, workers: int, network: Network | None = None) -> AlgorithmCost:
    """Plain data-parallel SGD: no second-order part."""
    kinds = traffic_by_kind(profile, strategy=None, owners=(), workers=workers,
                            config=PlanConfig())
    return AlgorithmCost(
        workers=workers, algorithm="sgd",
        step_time_s=(profile.forward_backward_s + gradient_allreduce_s(profile, workers=workers,
                                                                       network=network)
                     + profile.optimizer_s),
        second_order_s=0.0, comm_bytes_per_step=int(round(sum(kinds.values()))),
        memory_bytes_per_worker=profile.model_grad_bytes, comm_bytes_by_kind=kinds)


def algorithm_cost(profile: Profile, *, algorithm: str, workers: int, config: PlanConfig,
                   owners: Sequence[int] | None = None,
                   network: Network | None = None) -> AlgorithmCost:
    """Predicted step of `algorithm` (ALGORITHMS) at `workers` ranks; owners default to the
    algorithm's own choice (default_owners)."""
    if algorithm == "sgd":
        return sgd_cost(profile, workers=workers, network=network)
    strategy = STRATEGY_OF[algorithm]
    if owners is None:
        owners = default_owners(profile, algorithm=algorithm, workers=workers, config=config)
    step, second = kfac_times(profile, strategy=strategy, owners=owners, workers=workers,
                              config=config, network=network)
    kinds = traffic_by_kind(profile, strategy=strategy, owners=owners, workers=workers,
                            config=config)
    state = max(state_bytes_per_worker(profile, strategy=strategy, owners=owners,
                                       workers=workers))
    compute = max(compute_per_worker_s(profile, strategy=strategy, owners=owners,
                                       workers=workers, config=config))
    return AlgorithmCost(
        workers=workers, algorithm=algorithm, step_time_s=step, second_order_s=second,
        comm_bytes_per_step=int(round(sum(kinds.values()))),
        memory_bytes_per_worker=profile.model_grad_bytes + state,
        second_order_compute_s=compute, second_order_memory_bytes=state,
        comm_bytes_by_kind=kinds)


def mpd_kfac_cost(profile: Profile, *, workers: int, config: PlanConfig,
                  network: Network | None = None) -> AlgorithmCost:
    """MPD-KFAC: replicated all-reduced factors, LPT-spread decompositions, owners broadcast P."""
    return algorithm_cost(profile, algorithm="mpd-kfac", workers=workers, config=config,
                          network=network)


def kaisa_mem_opt_cost(profile: Profile, *, workers: int, config: PlanConfig,
                       network: Network | None = None) -> AlgorithmCost:
    """KAISA MEM-OPT (grad_worker_fraction 1/P): as MPD-KFAC, owners by LPT on d^3."""
    return algorithm_cost(profile, algorithm="kaisa-mem-opt", workers=workers, config=config,
                          network=network)


def kaisa_comm_opt_cost(profile: Profile, *, workers: int, config: PlanConfig,
                        network: Network | None = None) -> AlgorithmCost:
    """KAISA COMM-OPT (grad_worker_fraction 1): decompositions broadcast, all precondition all."""
    return algorithm_cost(profile, algorithm="kaisa-comm-opt", workers=workers, config=config,
                          network=network)


def dp_kfac_cost(profile: Profile, *, workers: int, config: PlanConfig, owners: Sequence[int],
                 algorithm: str = "dp-kfac", network: Network | None = None) -> AlgorithmCost:
    """DP-KFAC under the placement `owners` (layer i -> rank owners[i])."""
    cost = algorithm_cost(profile, algorithm="dp-kfac", workers=workers, config=config,
                          owners=owners, network=network)
    return dataclasses.replace(cost, algorithm=algorithm)
