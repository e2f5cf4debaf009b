"""Per-layer and per-worker costs that the step model and the solvers share.

Times in seconds per step, at speed 1, amortised over the update frequencies where said; sizes
in bytes. The step's structure and byte formulas are dpkfac.core.step's; the event-level
timeline that turns these costs into a step time is planner.model.simulate's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from dpkfac.core import step as core_step
from dpkfac.core.errors import InputError
from dpkfac.core.profile import LayerCost, Profile
from dpkfac.core.strategy import DP_KFAC, FactorMode, SharedResult, Strategy
from planner.model.network import Network, network_from_profile
from planner.solve.bounds import makespan_lower_bound_s
from planner.solve.instance import check_speeds


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


Split = Mapping[int, Sequence[int]]  # layer index -> G-side rows each rank preconditions


def applied_split(split: Split | None, strategy: Strategy | None) -> dict[int, tuple[int, ...]]:
    """The split preconditioning that `strategy` runs: `split` (layer index -> rows per rank)
    under DP-KFAC (factors LOCAL, preconditioned gradients shared); {} for every other strategy
    (they ignore a placement's split, as the executor does)."""
    if not split or strategy != DP_KFAC:
        return {}
    return {int(i): tuple(int(r) for r in rows) for i, rows in split.items()}


def split_shares(profile: Profile, split: Split, workers: int) -> np.ndarray:
    """[split layer, rank] share of each split layer's preconditioning that each rank does:
    rows[r] / dim_g (the work is exactly proportional to the rows), split layers in ascending
    index order."""
    index = sorted(split)
    if not index:
        return np.zeros((0, workers))
    rows = np.asarray([split[i] for i in index], dtype=float)
    if rows.shape[1] != workers:
        raise ValueError(f"a split gives {rows.shape[1]} row counts for {workers} workers")
    dims = np.asarray([profile.layers[i].dim_g for i in index], dtype=float)
    return rows / dims[:, None]


def unsplit_mask(profile: Profile, split: Split) -> np.ndarray:
    """True for the layers (profile order) whose preconditioning their owner does whole."""
    mask = np.ones(len(profile.layers), dtype=bool)
    mask[list(split)] = False
    return mask


def precondition_per_worker_s(profile: Profile, *, owners: Sequence[int], workers: int,
                              split: Split | None = None) -> np.ndarray:
    """Seconds of preconditioning per step on each rank at speed 1 under DP-KFAC: the owned
    layers that are not split, plus precondition_s * rows[r] / dim_g of every split layer."""
    split = split or {}
    costs = np.asarray([l.precondition_s for l in profile.layers], dtype=float)
    whole = per_owner(costs * unsplit_mask(profile, split), owners, workers)
    index = sorted(split)
    return whole + costs[index] @ split_shares(profile, split, workers)


def precondition_counts(profile: Profile, *, owners: Sequence[int], workers: int,
                        split: Split | None = None) -> np.ndarray:
    """Layers each rank preconditions (whole or a share of at least one row)."""
    split = split or {}
    whole = per_owner(unsplit_mask(profile, split).astype(float), owners, workers)
    return whole + (split_shares(profile, split, workers) > 0).sum(axis=0)


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
    return allreduce_wire_s(profile, nbytes=profile.model_grad_bytes, collective_s=total,
                            workers=workers, network=network)


def allreduce_wire_s(profile: Profile, *, nbytes: float, collective_s: float, workers: int,
                     network: Network | None = None) -> float:
    """Of one ring all-reduce of `nbytes` bytes taking `collective_s` seconds (packing
    excluded), the seconds on the wire, by gradient_allreduce_wire_s's rules (0 at one
    worker)."""
    if workers == 1:
        return 0.0
    if network is not None and network.source == "cluster":
        hop = network.allreduce_hop
        return min(2 * (workers - 1) / workers * nbytes * hop.beta_s_per_byte, collective_s)
    link = profile.comm.link_bytes_per_s
    if network is not None or link is None:
        return 0.0
    return min(2 * (workers - 1) / workers * nbytes / link, collective_s)


def gradient_allreduce_hidden_s(profile: Profile, *, workers: int,
                                network: Network | None = None) -> float:
    """An upper bound on the gradient all-reduce seconds an overlapped step hides behind
    compute: the larger of the fused all-reduce's wire seconds and, with the profile's
    gradient buckets, their summed wire seconds (0 at one worker)."""
    net = network_of(profile, network)
    buckets = sum(allreduce_wire_s(profile, nbytes=b.bytes, workers=workers, network=network,
                                   collective_s=net.allreduce_s(ranks=workers, nbytes=b.bytes))
                  for b in profile.gradient_buckets)
    return max(gradient_allreduce_wire_s(profile, workers=workers, network=network), buckets)


def gradient_allreduce_cpu_s(profile: Profile, *, workers: int,
                             network: Network | None = None) -> float:
    """Of gradient_allreduce_s, the seconds an overlapped step's all-reduce takes from its
    host's cores: what is not on the wire (gradient_allreduce_wire_s), at most the
    all-reduce's CPU seconds when the profile measured them (the rest is waiting: wake-ups,
    latency, which take no core: at 4x the bandwidth the latency floor is most of a 153 KB
    all-reduce, and charging it to the owner's CPU predicted 3 nodes slower at 400 Mbit/s
    than at 100)."""
    rest = (gradient_allreduce_s(profile, workers=workers, network=network)
            - gradient_allreduce_wire_s(profile, workers=workers, network=network))
    cpu = profile.comm.gradient_allreduce_cpu_s
    return rest if cpu is None else min(cpu, rest)


def common_memory_bytes(profile: Profile, *, workers: int) -> int:
    """Bytes every worker holds for DP-KFAC whatever it owns: the flat buffers of the fused
    broadcasts (one per owner, together all K-FAC layers' gradient bytes); 0 at one worker."""
    return profile.grad_bytes if workers > 1 else 0


def traffic_by_kind(profile: Profile, *, strategy: Strategy | None, owners: Sequence[int],
                    workers: int, config: PlanConfig,
                    split: Split | None = None) -> dict[str, float]:
    """Bytes one rank sends plus receives per step, by dpkfac.core.step.TRAFFIC_KINDS kind
    (strategy None: plain SGD), exactly as the executor counts them. split: layer index ->
    rows per rank (DP-KFAC only): those layers' decompositions are broadcast at updates and
    their preconditioned gradients all-reduced; only owners of unsplit layers broadcast every
    step."""
    split = applied_split(split, strategy)
    layers = profile.layers
    return core_step.traffic_by_kind(
        strategy=strategy, workers=workers, dtype_bytes=profile.dtype_bytes,
        model_grad_numel=profile.model_grad_bytes // profile.dtype_bytes,
        layer_dims=[(layer.dim_a, layer.dim_g) for layer in layers],
        grad_numel=sum(layer.grad_numel for layer in layers),
        owners=len({o for i, o in enumerate(owners) if i not in split}),
        compute_method=profile.compute_method,
        factor_update_freq=config.factor_update_freq, inv_update_freq=config.inv_update_freq,
        split_dims=[(layers[i].dim_a, layers[i].dim_g) for i in sorted(split)],
        split_owners=len({owners[i] for i in split}))


def state_bytes_per_worker(profile: Profile, *, strategy: Strategy | None,
                           owners: Sequence[int], workers: int,
                           split: Split | None = None) -> tuple[int, ...]:
    """Bytes of second-order state each rank holds: LOCAL factors, the owned layers' state, and
    (DP-KFAC with `split`) each split layer's decomposition on every rank but its owner;
    ALLREDUCED, all factors plus the owned decompositions (PRECONDITIONED_GRADIENT) or all of
    them (DECOMPOSITION). None (SGD): nothing."""
    if strategy is None:
        return (0,) * workers
    if strategy.factors is FactorMode.LOCAL:
        split = applied_split(split, strategy)
        held = per_owner(layer_state_bytes(profile), owners, workers)
        decomps = np.asarray(decomposition_sizes(profile), dtype=float)[sorted(split)]
        split_owners = [owners[i] for i in sorted(split)]
        held += decomps.sum() - per_owner(decomps, split_owners, workers)
        return tuple(int(v) for v in held)
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


def own_broadcast_lower_bound_s(profile: Profile, *, workers: int,
                                network: Network | None = None) -> float:
    """A proven lower bound on the seconds of one owner's preconditioned-gradient broadcast,
    which starts no earlier than that owner's preconditioning ends: one broadcast of at least
    the smallest layer's and at most all layers' gradient bytes (Network.broadcast_floor_s; 0
    without layers)."""
    if not profile.layers:
        return 0.0
    smallest = min(grad_bytes(layer, profile=profile) for layer in profile.layers)
    return network_of(profile, network).broadcast_floor_s(
        ranks=workers, min_bytes=smallest, max_bytes=profile.grad_bytes)


def split_allreduce_lower_bound_s(profile: Profile, *, workers: int,
                                  network: Network | None = None) -> float:
    """A proven lower bound on the seconds of the all-reduce of split layers' gradients that
    any placement splitting at least one layer pays every step: one all-reduce of the smallest
    layer's gradient (Network.allreduce_floor_s; 0 without layers)."""
    if not profile.layers:
        return 0.0
    smallest = min(grad_bytes(layer, profile=profile) for layer in profile.layers)
    return network_of(profile, network).allreduce_floor_s(ranks=workers, nbytes=smallest)


def split_compute_lower_bound_s(profile: Profile, *, workers: int, config: PlanConfig,
                                speeds: Sequence[float] | None = None) -> float:
    """A proven lower bound on the busiest worker's amortised K-FAC compute, seconds, when
    layers' preconditioning may be split across workers. A layer's factors and decompositions
    run whole on its owner (fixed_l = factor_s / factor_update_freq + decompose_s /
    inv_update_freq), its precondition_s may be spread over any workers in any shares. So: the
    makespan bounds of the fixed parts alone (largest, pigeonhole: a layer's owner does at
    least its fixed part) and total work / total speed (perfect sharing). fixed_l +
    precondition_s / workers would NOT be a bound: the other workers may take all of a split
    layer's rows and leave its owner only the fixed part."""
    fixed = [l.factor_s / config.factor_update_freq + l.decompose_s / config.inv_update_freq
             for l in profile.layers]
    total = sum(layer_works_s(profile, config=config))
    return max(makespan_lower_bound_s(work=fixed, workers=workers, speeds=speeds),
               total / sum(check_speeds(speeds, workers)))


def second_order_lower_bound_s(profile: Profile, *, workers: int, config: PlanConfig,
                               speeds: Sequence[float] | None = None,
                               compute_bound_s: float = 0.0,
                               network: Network | None = None, split: bool = False) -> float:
    """A proven lower bound on DP-KFAC's amortised second-order seconds for any placement:
    the larger of (a) max(total work / sum of speeds, pigeonhole bound, compute_bound_s) plus
    own_broadcast_lower_bound_s (the busiest worker, an owner, broadcasts after its own
    preconditioning; the broadcasts go in rank order, so the others' may run under its
    compute) and (b) the broadcast bound (every broadcast starts after the gradient
    all-reduce). `compute_bound_s` lets a solver's proven bound (e.g. an ILP dual bound)
    tighten it. With the overlapped step (config.overlap, more than one worker) the gradient
    all-reduce may hide up to its wire seconds of that compute (second-order time counts from
    its end), plus the head start the fastest worker's forward/backward gives it over the
    slowest's. With contention (ranks sharing a host), compute runs at best at a lone
    worker's speed.

    split (more than one worker): placements may also split layers' preconditioning
    (precondition_split). One that splits nothing keeps the bound above; one that splits a
    layer has compute at least split_compute_lower_bound_s (the solvers' whole-layer bound
    does not apply to it), adjusted as above, and, serial, pays every step at least
    split_allreduce_lower_bound_s after every rank's preconditioning (the all-reduce of the
    shares comes after the broadcasts; overlapped it may run under the ranks' own
    preconditioning, so nothing is added). The bound is the lesser of the two."""
    works = layer_works_s(profile, config=config)
    whole = max(makespan_lower_bound_s(work=works, workers=workers, speeds=speeds),
                compute_bound_s)
    bound = max(_reachable_compute_s(profile, whole, workers=workers, config=config,
                                     speeds=speeds, network=network)
                + own_broadcast_lower_bound_s(profile, workers=workers, network=network),
                broadcast_lower_bound_s(profile, workers=workers, network=network))
    if not split or workers == 1:
        return bound
    shared = split_compute_lower_bound_s(profile, workers=workers, config=config, speeds=speeds)
    after = 0.0 if config.overlap else split_allreduce_lower_bound_s(profile, workers=workers,
                                                                     network=network)
    return min(bound, _reachable_compute_s(profile, shared, workers=workers, config=config,
                                           speeds=speeds, network=network) + after)


def _reachable_compute_s(profile: Profile, compute_s: float, *, workers: int,
                         config: PlanConfig, speeds: Sequence[float] | None,
                         network: Network | None) -> float:
    """Of a bound on the busiest worker's compute, seconds, what must fall in the second-order
    part: at a lone worker's speed with contention, less what an overlapped all-reduce and a
    fast worker's head start may hide."""
    if profile.contention is not None and profile.contention.applies(workers):
        compute_s *= profile.contention.time_factor(1)  # a worker computing alone, at best
    if config.overlap and workers > 1:  # a fast worker starts its local work earlier still
        fastest, slowest = (max(speeds), min(speeds)) if speeds else (1.0, 1.0)
        hidden = (gradient_allreduce_hidden_s(profile, workers=workers, network=network)
                  + profile.forward_backward_posting_s(True) * (1 / slowest - 1 / fastest))
        compute_s = max(compute_s - hidden, 0.0)
    return compute_s
