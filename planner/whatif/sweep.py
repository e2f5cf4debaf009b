"""What-if sweep: predicted step time, traffic and memory per worker count and algorithm.

From one profile, for every point of a sweep (worker count x per-worker batch size x bandwidth
scale x update frequencies, on a flat network from the profile or on nodes x GPUs per node from a
cluster file) and every algorithm in planner.algorithms.ALGORITHMS, one row with the CONTRACTS
keys (ROW_KEYS) and the settings of its point. Scaling assumptions, per point:

* batch size b (per worker) instead of the profile's b0: forward/backward and factor
  construction scale by b / b0 (both linear in rows); decompositions, preconditioning, state and
  traffic do not depend on the batch;
* bandwidth scale s: every collective's time beyond its latency floor (the smallest measured
  message's time) divided by s, on the measured curve (the fits: seconds per byte / s);
* cluster: workers sit node-major on nodes of `gpus_per_node` GPUs; the ring's slowest hop sets
  the collectives' costs (planner.cluster.cluster_network).

The scaling knee (weak scaling, fixed per-worker batch): throughput is workers / step time; going
from P1 to P2 workers pays when the throughput gain is at least `efficiency` of the ideal gain
(P2 / P1 - 1). The knee is where the last paying step of the sweep ends: beyond it no step pays.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

from dpkfac.core.cluster import Cluster, Link
from dpkfac.core.errors import InputError
from dpkfac.core.profile import AlphaBeta, MeasuredPoints, Profile
from planner.model.buckets import lone_buckets_s
from planner.model.costs import PlanConfig
from planner.model.network import Network
from planner.model.topology import cluster_network, on_profiled_hosts
from planner.whatif.baselines import ALGORITHMS, algorithm_cost, default_owners

WHATIF_SCHEMA_ID = "dpkfac.whatif/1"
ROW_KEYS = ("workers", "algorithm", "step_time_s", "second_order_s", "comm_bytes_per_step",
            "memory_bytes_per_worker")
SETTING_KEYS = ("batch_size", "bandwidth_scale", "factor_update_freq", "inv_update_freq",
                "gpus_per_node")
MAX_WORKERS = 1 << 20


@dataclass(frozen=True)
class Topology:
    """Nodes of `gpus_per_node` GPUs joined by `inter_node` links (from a cluster file)."""
    gpus_per_node: int
    intra_node: Link
    inter_node: Link | None

    def network(self, workers: int) -> Network:
        """Per-hop collective costs of `workers` GPUs laid out node-major."""
        per_node = min(self.gpus_per_node, workers)
        inter = self.inter_node if workers > per_node else None
        if workers > per_node and inter is None:
            raise InputError(f"{workers} workers need more than one node of {per_node} GPUs: "
                             "the cluster file has no inter_node link")
        cluster = Cluster(workers=workers, gpus_per_node=per_node, speeds=(1.0,) * workers,
                          memory_bytes=(None,) * workers, intra_node=self.intra_node,
                          inter_node=inter)
        return cluster_network(cluster)


@dataclass(frozen=True)
class Sweep:
    """The axes of a what-if sweep; every combination is one point. batch_sizes None: the
    profile's batch; topology None: the profile's measured collectives, rescaled."""
    workers: tuple[int, ...]
    batch_sizes: tuple[int, ...] | None = None
    bandwidth_scales: tuple[float, ...] = (1.0,)
    factor_update_freqs: tuple[int, ...] = (1,)
    inv_update_freqs: tuple[int, ...] = (1,)
    topology: Topology | None = None
    algorithms: tuple[str, ...] = ALGORITHMS
    placement_owners: tuple[int, ...] | None = None  # dp-kfac's owners at placement_workers
    placement_workers: int | None = None
    placement_split: Mapping[int, tuple[int, ...]] | None = None  # its precondition_split
    overlap: bool = True  # dp-kfac rows: the overlapped step (False: the serial one)

    def __post_init__(self) -> None:
        for p in self.workers:
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= MAX_WORKERS:
                raise InputError(f"worker counts must be integers in 1..{MAX_WORKERS}, got {p!r}")
        for s in self.bandwidth_scales:
            if not 0 < s < float("inf"):
                raise InputError(f"bandwidth scales must be positive numbers, got {s!r}")
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown:
            raise InputError(f"unknown algorithm {unknown[0]!r}; expected {', '.join(ALGORITHMS)}")


def scale_batch(profile: Profile, batch_size: int) -> Profile:
    """The profile at another per-worker batch: forward/backward (the gradient buckets' ready
    times with it) and factor construction scale linearly with the batch; everything else
    stays."""
    if batch_size == profile.batch_size:
        return profile
    ratio = batch_size / profile.batch_size
    layers = tuple(dataclasses.replace(l, factor_a_s=l.factor_a_s * ratio,
                                       factor_g_s=l.factor_g_s * ratio) for l in profile.layers)
    return dataclasses.replace(profile, batch_size=batch_size,
                               layers=layers).forward_backward_scaled(ratio)


def scale_bandwidth(profile: Profile, scale: float) -> Profile:
    """The profile on links `scale` times as fast: each collective's measured curve keeps its
    latency floor (the least measured time) and divides the rest by `scale`, or, when the
    profile knows the link rate (`profile --link-rate`), shrinks each call that waited for the
    wire with that wait and keeps the others (and the links' token bucket, `profile
    --link-burst`, in seconds, as full as it was when the profile's calls started:
    CommCosts.refilled_burst_s),
    the all-reduce's never below the hosts' CPU seconds the profile measured for it
    (comm.gradient_allreduce_cpu_s, per byte) (MeasuredPoints.faster_link); the alpha-beta
    fits divide seconds per byte by `scale`."""
    if scale == 1.0:
        return profile
    comm = profile.comm

    def faster(points: MeasuredPoints | None, kind: str,
               host_s_per_byte: float | None = None) -> MeasuredPoints | None:
        return None if points is None else points.faster_link(
            scale, wire_s_per_byte=comm.wire_s_per_byte(kind), host_s_per_byte=host_s_per_byte,
            burst_s=comm.refilled_burst_s())

    costs = dataclasses.replace(comm, allreduce=_faster_fit(comm.allreduce, scale),
                                broadcast=_faster_fit(comm.broadcast, scale),
                                allreduce_points=faster(comm.allreduce_points, "allreduce",
                                                        _allreduce_host_s_per_byte(profile)),
                                broadcast_points=faster(comm.broadcast_points, "broadcast"),
                                link_bytes_per_s=None if comm.link_bytes_per_s is None
                                else comm.link_bytes_per_s * scale)
    faster_profile = dataclasses.replace(profile, comm=costs)
    if comm.gradient_buckets_s is None:
        return faster_profile
    # the bucket chain keeps its fraction of its buckets' lone times (buckets.chained_fraction)
    ratio = lone_buckets_s(faster_profile) / lone_buckets_s(profile)
    return dataclasses.replace(faster_profile, comm=dataclasses.replace(
        costs, gradient_buckets_s=comm.gradient_buckets_s * ratio))


def _allreduce_host_s_per_byte(profile: Profile) -> float | None:
    """The hosts' CPU seconds per byte of an all-reduce, from the profile's measured gradient
    all-reduce (comm.gradient_allreduce_cpu_s; None without it)."""
    cpu = profile.comm.gradient_allreduce_cpu_s
    if cpu is None or profile.model_grad_bytes <= 0:
        return None
    return cpu / profile.model_grad_bytes


def _faster_fit(fit: AlphaBeta, scale: float) -> AlphaBeta:
    return AlphaBeta(alpha_s=fit.alpha_s, beta_s_per_byte=fit.beta_s_per_byte / scale)


def _scaled_network(network: Network, scale: float) -> Network:
    faster = lambda points: None if points is None else points.faster_link(scale)  # noqa: E731
    return dataclasses.replace(network, broadcast_hop=_faster_fit(network.broadcast_hop, scale),
                               allreduce_hop=_faster_fit(network.allreduce_hop, scale),
                               broadcast_points=faster(network.broadcast_points),
                               allreduce_points=faster(network.allreduce_points))


@dataclass(frozen=True)
class _Point:
    """One setting of a sweep: its plan configuration and its batch- and bandwidth-scaled
    profile."""
    settings: dict
    config: PlanConfig
    profile: Profile

    @property
    def scale(self) -> float:
        return self.settings["bandwidth_scale"]

    def others(self) -> tuple:
        """The settings besides the bandwidth scale."""
        return tuple(v for k, v in self.settings.items() if k != "bandwidth_scale")

    def network(self, sweep: Sweep, workers: int) -> Network | None:
        """The cluster file's links on the profile's hosts (topology), or None: the profile's."""
        if sweep.topology is None:
            return None
        return on_profiled_hosts(_scaled_network(sweep.topology.network(workers), self.scale),
                                 self.profile.comm)


def _points(profile: Profile, sweep: Sweep) -> list[_Point]:
    batches = sweep.batch_sizes or (profile.batch_size,)
    return [_Point(settings={"batch_size": batch, "bandwidth_scale": scale,
                             "factor_update_freq": ffreq, "inv_update_freq": ifreq,
                             "gpus_per_node": sweep.topology.gpus_per_node
                             if sweep.topology else None},
                   config=PlanConfig(factor_update_freq=ffreq, inv_update_freq=ifreq,
                                     overlap=sweep.overlap),
                   profile=scale_bandwidth(scale_batch(profile, batch), scale))
            for batch, scale, ffreq, ifreq in itertools.product(
                batches, sweep.bandwidth_scales, sweep.factor_update_freqs,
                sweep.inv_update_freqs)]


def _planned_owners(points: Sequence[_Point], sweep: Sweep) -> dict[tuple[int, int], tuple]:
    """(point index, workers) -> dp-kfac's owners where the planner places them: the planner's
    owners at that point, or those it found at another bandwidth scale of the same setting when
    they predict a shorter step there. The planner searches under a time budget, so on a busy
    host two scales can get different owners; sharing the candidates keeps the step
    non-increasing in bandwidth."""
    if "dp-kfac" not in sweep.algorithms:
        return {}
    found: dict[tuple[int, int], tuple] = {}
    for i, point in enumerate(points):
        for p in sweep.workers:
            if p != sweep.placement_workers or sweep.placement_owners is None:
                found[i, p] = default_owners(point.profile, algorithm="dp-kfac", workers=p,
                                             config=point.config,
                                             network=point.network(sweep, p))
    shared: dict[tuple, set] = {}  # (other settings, workers) -> owners found at any scale
    for (i, p), owners in found.items():
        shared.setdefault((points[i].others(), p), set()).add(owners)
    chosen = {}
    for (i, p), owners in found.items():
        point = points[i]
        candidates = shared[point.others(), p]

        def step_s(candidate: tuple) -> float:
            return algorithm_cost(point.profile, algorithm="dp-kfac", workers=p,
                                  config=point.config, network=point.network(sweep, p),
                                  owners=candidate).step_time_s

        chosen[i, p] = min(sorted(candidates), key=step_s) if len(candidates) > 1 else owners
    return chosen


def sweep_rows(profile: Profile, sweep: Sweep) -> list[dict]:
    """One row per (point, algorithm): ROW_KEYS, SETTING_KEYS, and the per-kind breakdown.

    Rows come grouped by settings, then worker count, then algorithm (sweep.algorithms order).
    dp-kfac runs on the planner's owners (_planned_owners), or on sweep.placement_owners at its
    worker count."""
    rows: list[dict] = []
    points = _points(profile, sweep)
    planned = _planned_owners(points, sweep)
    for i, point in enumerate(points):
        for p in sweep.workers:
            network = point.network(sweep, p)
            placed = sweep.placement_owners if p == sweep.placement_workers else None
            for name in sweep.algorithms:
                dp = name == "dp-kfac"
                cost = algorithm_cost(point.profile, algorithm=name, workers=p,
                                      config=point.config, network=network,
                                      owners=planned.get((i, p), placed) if dp else None,
                                      split=sweep.placement_split
                                      if placed is not None and dp else None)
                rows.append({**cost.as_row(), **point.settings})
    return rows


def scaling_knee(rows: Sequence[dict], *, efficiency: float = 0.5) -> int | None:
    """The worker count after which adding workers stops paying, for rows of ONE algorithm and
    one setting (weak scaling, see the module docstring): the end of the last step of the sweep
    that pays, or the smallest count when none does; None when every step pays (or there is
    only one worker count)."""
    points = sorted({r["workers"]: r["step_time_s"] for r in rows}.items())
    pays = [(p2 / t2) / (p1 / t1) - 1 >= efficiency * (p2 / p1 - 1)
            for (p1, t1), (p2, t2) in zip(points, points[1:])]
    if all(pays):
        return None
    paying = [i for i, ok in enumerate(pays) if ok]
    return points[paying[-1] + 1][0] if paying else points[0][0]


def setting_groups(rows: Sequence[dict]) -> list[tuple[dict, list[dict]]]:
    """Rows grouped by their SETTING_KEYS values, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in SETTING_KEYS), []).append(row)
    return [(dict(zip(SETTING_KEYS, key)), members) for key, members in groups.items()]


def knees(rows: Sequence[dict], *, efficiency: float = 0.5) -> dict[str, int | None]:
    """scaling_knee of every algorithm in `rows` (rows of one setting)."""
    names = list(dict.fromkeys(r["algorithm"] for r in rows))
    return {name: scaling_knee([r for r in rows if r["algorithm"] == name],
                               efficiency=efficiency) for name in names}


def expand_workers(text: str) -> tuple[int, ...]:
    """Worker counts from '1,2,4,8' or powers-of-two ranges 'A..B' ('1..4096' is 1, 2, 4, ...,
    4096; A need not be a power of two: A, 2A, 4A, ... up to B), mixed freely, in order,
    duplicates dropped. InputError when malformed."""
    from dpkfac.core.units import parse_int_list

    values: list[int] = []
    for part in text.split(","):
        if ".." in part:
            low_text, _, high_text = part.partition("..")
            low, high = parse_int_list(low_text, what="--workers")[0], \
                parse_int_list(high_text, what="--workers")[0]
            if low > high:
                raise InputError(f"--workers range {part.strip()!r} runs backwards")
            value = low
            while value <= high:
                values.append(value)
                value *= 2
        else:
            values.extend(parse_int_list(part, what="--workers"))
    if any(v > MAX_WORKERS for v in values):
        raise InputError(f"--workers {text!r}: at most {MAX_WORKERS} workers")
    return tuple(dict.fromkeys(values))
