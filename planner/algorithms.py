"""Predicted per-step costs of DP-KFAC and the algorithms it is compared with.

All on the same profile and alpha-beta model (planner.comm), per step, amortised over the
update frequencies; seconds and bytes. Workers are identical (speed 1). Collective counting:
a ring all-reduce of n bytes moves 2 (p-1)/p n bytes per rank; a fused broadcast round counts,
for every rank, the bytes it sends (its own layers) plus those it receives (the others).

* sgd: forward/backward + gradient all-reduce + optimizer.
* mpd-kfac: every worker builds ALL factors (every factor_update_freq steps); the factors are
  all-reduced (modelled as one fused call of dtype_bytes (dim_a^2 + dim_g^2) per layer, which
  favours the baseline); decompositions are spread by longest-processing-time on their measured
  times; the owner preconditions and broadcasts the preconditioned gradient (one fused broadcast
  per owner). Memory: all factors + own decompositions.
* kaisa-comm-opt: as mpd-kfac, but owners are chosen by LPT on KAISA's d^3 cost estimate, the
  decompositions are broadcast to all (one fused broadcast per owner, every inv_update_freq) and
  everyone preconditions every layer. Memory: all factors + all decompositions.
* kaisa-mem-opt: as mpd-kfac (owner preconditions and broadcasts P) with KAISA's d^3 assignment.
* dp-kfac / dp-kfac-round-robin: planner.costmodel under a given placement; memory is the
  profile's state_bytes of the owned layers.

Decomposition sizes: eigen keeps dim^2 + dim elements per factor, inverse dim^2.
memory_bytes_per_worker is the busiest worker's gradient (model_grad_bytes) + second-order state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from . import comm
from .costmodel import PlanConfig, broadcast_total_s, gradient_allreduce_s, predict
from .profile import LayerCost, Profile
from .solvers import memory_loads, solve

ALGORITHMS = ("sgd", "mpd-kfac", "kaisa-comm-opt", "kaisa-mem-opt", "dp-kfac-round-robin",
              "dp-kfac")


@dataclass(frozen=True)
class AlgorithmCost:
    """One algorithm's predicted step at one worker count. Seconds; bytes per worker."""
    workers: int
    algorithm: str
    step_time_s: float
    second_order_s: float
    comm_bytes_per_step: int
    memory_bytes_per_worker: int

    def as_row(self) -> dict:
        """The what-if row (CONTRACTS.md) as a plain dict."""
        return asdict(self)


def factor_bytes(layer: LayerCost, *, dtype_bytes: int) -> int:
    """Bytes of a layer's two Kronecker factors A (dim_a^2) and G (dim_g^2)."""
    return dtype_bytes * (layer.dim_a ** 2 + layer.dim_g ** 2)


def decomposition_bytes(layer: LayerCost, *, dtype_bytes: int, compute_method: str) -> int:
    """Bytes of a layer's decompositions: eigen dim^2 + dim per factor, inverse dim^2."""
    extra = 1 if compute_method == "eigen" else 0
    return dtype_bytes * sum(d * d + extra * d for d in (layer.dim_a, layer.dim_g))


def sgd_cost(profile: Profile, *, workers: int) -> AlgorithmCost:
    """Plain data-parallel SGD: no second-order part."""
    return AlgorithmCost(
        workers=workers, algorithm="sgd",
        step_time_s=(profile.forward_backward_s + gradient_allreduce_s(profile, workers=workers)
                     + profile.optimizer_s),
        second_order_s=0.0,
        comm_bytes_per_step=int(round(comm.ring_allreduce_bytes(
            ranks=workers, nbytes=profile.model_grad_bytes))),
        memory_bytes_per_worker=profile.model_grad_bytes,
    )


def mpd_kfac_cost(profile: Profile, *, workers: int, config: PlanConfig) -> AlgorithmCost:
    """MPD-KFAC: replicated factors, LPT-spread decompositions, owner broadcasts P."""
    owners = _lpt_owners([l.decompose_s for l in profile.layers], workers=workers)
    return _owner_preconditions(profile, workers=workers, config=config, owners=owners,
                                algorithm="mpd-kfac")


def kaisa_mem_opt_cost(profile: Profile, *, workers: int, config: PlanConfig) -> AlgorithmCost:
    """KAISA MEM-OPT (grad_worker_fraction 1/P): like MPD-KFAC, owners by LPT on d^3."""
    return _owner_preconditions(profile, workers=workers, config=config,
                                owners=_kaisa_owners(profile, workers=workers),
                                algorithm="kaisa-mem-opt")


def kaisa_comm_opt_cost(profile: Profile, *, workers: int, config: PlanConfig) -> AlgorithmCost:
    """KAISA COMM-OPT (grad_worker_fraction 1): decompositions broadcast, all precondition all."""
    owners = _kaisa_owners(profile, workers=workers)
    dtype = profile.dtype_bytes
    decomp = [decomposition_bytes(l, dtype_bytes=dtype, compute_method=profile.compute_method)
              for l in profile.layers]
    own_decompose = _per_worker([l.decompose_s for l in profile.layers], owners, workers)
    own_decomp_bytes = memory_loads(memory=decomp, owners=owners, workers=workers)
    used = set(owners)
    decomp_broadcast = sum(
        comm.broadcast_s(profile.comm.broadcast, measured_ranks=profile.comm.world_size,
                         ranks=workers, nbytes=nbytes)
        for rank, nbytes in enumerate(own_decomp_bytes) if rank in used)
    second_order = (_replicated_factor_s(profile, workers=workers, config=config)
                    + (max(own_decompose) + decomp_broadcast) / config.inv_update_freq
                    + sum(l.precondition_s for l in profile.layers))
    traffic = (comm.ring_allreduce_bytes(ranks=workers, nbytes=profile.model_grad_bytes)
               + _factor_ring_bytes(profile, workers=workers, config=config)
               + (sum(decomp) / config.inv_update_freq if workers > 1 else 0))
    memory = _all_factor_bytes(profile) + sum(decomp)
    return _cost(profile, workers=workers, algorithm="kaisa-comm-opt", second_order_s=second_order,
                 comm_bytes=traffic, state_bytes=memory)


def dp_kfac_cost(profile: Profile, *, workers: int, config: PlanConfig, owners: Sequence[int],
                 algorithm: str = "dp-kfac") -> AlgorithmCost:
    """DP-KFAC under the placement `owners` (layer i -> rank owners[i])."""
    pred = predict(profile, owners=owners, workers=workers, config=config)
    return AlgorithmCost(
        workers=workers, algorithm=algorithm, step_time_s=pred.step_time_s,
        second_order_s=pred.second_order_s, comm_bytes_per_step=max(pred.comm_bytes),
        memory_bytes_per_worker=profile.model_grad_bytes + max(pred.memory_bytes),
    )


# ----------------------------------------------------------------------------- internals

def _lpt_owners(weights: Sequence[float], *, workers: int) -> tuple[int, ...]:
    return solve("greedy", work=weights, workers=workers).owners


def _kaisa_owners(profile: Profile, *, workers: int) -> tuple[int, ...]:
    """KAISA's assignment: greedy LPT on the estimated decomposition cost dim_a^3 + dim_g^3."""
    return _lpt_owners([float(l.dim_a ** 3 + l.dim_g ** 3) for l in profile.layers],
                       workers=workers)


def _per_worker(values: Sequence[float], owners: Sequence[int], workers: int) -> list[float]:
    totals = [0.0] * workers
    for value, owner in zip(values, owners):
        totals[owner] += value
    return totals


def _all_factor_bytes(profile: Profile) -> int:
    return sum(factor_bytes(l, dtype_bytes=profile.dtype_bytes) for l in profile.layers)


def _factor_ring_bytes(profile: Profile, *, workers: int, config: PlanConfig) -> float:
    return (comm.ring_allreduce_bytes(ranks=workers, nbytes=_all_factor_bytes(profile))
            / config.factor_update_freq)


def _replicated_factor_s(profile: Profile, *, workers: int, config: PlanConfig) -> float:
    """Every worker builds all factors, then one fused all-reduce of them; per step, seconds."""
    build = sum(l.factor_s for l in profile.layers)
    reduce = comm.allreduce_s(profile.comm.allreduce, measured_ranks=profile.comm.world_size,
                              ranks=workers, nbytes=_all_factor_bytes(profile))
    return (build + reduce) / config.factor_update_freq


def _owner_preconditions(profile: Profile, *, workers: int, config: PlanConfig,
                         owners: Sequence[int], algorithm: str) -> AlgorithmCost:
    """Replicated factors; the owner decomposes, preconditions and broadcasts P (fused)."""
    own = _per_worker([l.decompose_s / config.inv_update_freq + l.precondition_s
                       for l in profile.layers], owners, workers)
    second_order = (_replicated_factor_s(profile, workers=workers, config=config) + max(own)
                    + broadcast_total_s(profile, owners=owners, workers=workers))
    decomp = [decomposition_bytes(l, dtype_bytes=profile.dtype_bytes,
                                  compute_method=profile.compute_method) for l in profile.layers]
    traffic = (comm.ring_allreduce_bytes(ranks=workers, nbytes=profile.model_grad_bytes)
               + _factor_ring_bytes(profile, workers=workers, config=config)
               + (profile.grad_bytes if workers > 1 else 0))
    memory = _all_factor_bytes(profile) + max(memory_loads(memory=decomp, owners=owners,
                                                           workers=workers))
    return _cost(profile, workers=workers, algorithm=algorithm, second_order_s=second_order,
                 comm_bytes=traffic, state_bytes=memory)


def _cost(profile: Profile, *, workers: int, algorithm: str, second_order_s: float,
          comm_bytes: float, state_bytes: int) -> AlgorithmCost:
    return AlgorithmCost(
        workers=workers, algorithm=algorithm,
        step_time_s=(profile.forward_backward_s + gradient_allreduce_s(profile, workers=workers)
                     + second_order_s + profile.optimizer_s),
        second_order_s=second_order_s,
        comm_bytes_per_step=int(round(comm_bytes)),
        memory_bytes_per_worker=profile.model_grad_bytes + int(state_bytes),
    )
