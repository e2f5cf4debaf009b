"""Event-level simulation of training steps as the executor runs them, for every strategy.

One step, on every worker w (compute divided by w's speed; seconds), in the phase order of
dpkfac.core.step.PHASES:

1. forward_backward (with the profile's backward_allreduce_s added when the buckets are
   posted from backward, below);
2. the gradient all-reduce, in buckets (planner.model.buckets; a profile without
   `step.gradient_buckets`: one fused all-reduce of the whole gradient), collectives: each
   starts when the slowest worker has posted it. Serial (below): the buckets' all-reduces back
   to back once the slowest worker's forward/backward ends;
3. factors: the owned layers' (LOCAL) or every layer's (ALLREDUCED) factor construction, on
   steps where step % factor_update_freq == 0;
4. factor_allreduce (ALLREDUCED, on those steps): one fused all-reduce of every layer's factors;
5. decompose: the owned layers whose decomposition falls on this step (all at
   step % inv_update_freq == 0, or, with a staggered `decomposition_step` schedule, the layers
   whose slot is step % inv_update_freq);
6. DECOMPOSITION (KAISA COMM-OPT): at step % inv_update_freq == 0 the owners broadcast their
   decompositions (posted together), then every worker preconditions every layer.
   PRECONDITIONED_GRADIENT, every step: every owner preconditions its layers and broadcasts
   the result, one fused broadcast per owner, in ascending owner rank: rank r posts the
   broadcasts of owners below it before its own preconditioning, its own right after, then
   those above it, so owner o's broadcast may start at max(precondition end of ranks 0..o,
   precondition start of ranks above o) and they run in that order
   (Network.broadcast_queue_end_s); when every rank finishes at once, that is the broadcasts
   posted together (Network.broadcast_group_s). DP-KFAC with split layers (`split`: layer
   index -> G-side rows per rank): at step % inv_update_freq == 0 their owners first
   broadcast the split layers' decompositions (one fused broadcast per such owner, posted
   together, timed as broadcast; split layers are never staggered); every rank preconditions
   its owned unsplit layers and rows[r] / dim_g of every split layer (precondition); the
   owners' broadcasts of the unsplit layers as above, then one fused all-reduce of the split
   layers' shares once they are done (timed as broadcast). Overlapped (config.overlap) every
   rank preconditions its shares first and posts their all-reduce, which runs (its wire
   seconds; the rest takes the hosts' CPU) while the ranks precondition their own layers;
   their receives are posted after it;
7. apply (KL clip, write-back), then the optimizer.

Bucket posting (config.overlap, more than one worker, a profile with gradient buckets, every
strategy): bucket i's all-reduce is posted from backward once the slowest worker has it ready
(its ready_s over forward_backward_s of that worker's forward/backward) and runs once bucket
i-1's is done. Without buckets in the profile the one fused all-reduce is posted at the end of
forward/backward. Overlapped (config.overlap, strategies whose factors are LOCAL, more than
one worker): each worker also runs its factors and decompositions (3, 5: they need only its
own batch) while the all-reduces are in flight, and waits for the last before
preconditioning. Only each all-reduce's time on the wire hides (costs.allreduce_wire_s, per
bucket); the hosts' part of them takes the worker's CPU after its forward/backward (timed as
allreduce), or, with contention (below), runs on the collective's threads beside the
compute, sharing the cores. Otherwise the step is serial, as listed.

Ranks that share a host (profile.contention, at the profiled world size): compute between two
collectives is laid out by processor sharing (planner.model.sharing): with k workers computing
at once each takes Contention.time_factor(k) times its busy figure, so an owner left computing
alone runs faster than the all-ranks-busy figures the profile holds. The chain of bucket
all-reduces posted from backward runs at its own pace beside the compute (only its hosts'
part takes the cores).

A collective needs every rank: it starts when the last one has posted it. A broadcast's root
returns once its bytes are in its sockets' buffers (Network.broadcast_root_s) while the others
still read them, so the last owner of step 6 may be done before the rest and begin the next
step early; the steps of a cycle are simulated in that steady state (simulate_cycle), each
from the workers' leads at the end of the one before. Plain SGD (strategy None) has steps 1,
2 and 7's optimizer only. A cycle is lcm(factor_update_freq, inv_update_freq) steps; its mean
step is the prediction. Per worker: busy (computing), comm
(in a collective) and idle (waiting) seconds; the critical path is the chain of segments that
set the step's end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from dpkfac.core.profile import Profile
from dpkfac.core.step import PHASES
from dpkfac.core.strategy import DP_KFAC, FactorMode, Strategy
from planner.model.buckets import (
    BucketCost,
    bucket_chain,
    bucket_costs,
    buckets_cpu_s,
    chained_seconds,
)
from planner.model.costs import (
    PlanConfig,
    Split,
    applied_split,
    factor_bytes,
    network_of,
    per_owner,
)
from planner.model.network import Network
from planner.model.shared_phases import shared_phases
from planner.model.timeline import Segment, Timeline
from planner.solve.instance import check_speeds


@dataclass(frozen=True)
class StepResult:
    """One simulated step. Seconds; per-worker tuples by rank.

    second_order_s: from the end of the gradient all-reduce to the end of the last second-order
    phase (overlapped: what of the second order the all-reduce does not hide). compute_makespan_s: the largest per-worker K-FAC compute of this step.
    phases_s: per phase (PHASES), per worker, as the executor's timers see it (waiting included).
    precondition_end_s: when each worker's preconditioning ended (empty for plain SGD).
    end_s: when each worker is done with the step (the step's time for the last; a
    broadcast's root may be done before). Times from the start of the step of the worker that
    began it last.
    """
    step_time_s: float
    second_order_s: float
    compute_makespan_s: float
    allreduce_s: float
    broadcast_s: float
    busy_s: tuple[float, ...]
    comm_s: tuple[float, ...]
    idle_s: tuple[float, ...]
    critical_path: tuple[Segment, ...]
    phases_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    precondition_end_s: tuple[float, ...] = ()
    end_s: tuple[float, ...] = ()

    def leads(self) -> np.ndarray:
        """How much earlier than the last worker each one begins the next step, as seconds
        at or below 0 (the next step's `start`)."""
        ends = np.asarray(self.end_s, dtype=float)
        return ends - ends.max()


@dataclass(frozen=True)
class CycleResult:
    """Every step of one cycle (`steps[k]` is step k of the cycle) and the means over it."""
    steps: tuple[StepResult, ...]

    @property
    def mean_step_time_s(self) -> float:
        """Mean step time over the cycle, seconds."""
        return float(np.mean([s.step_time_s for s in self.steps]))

    @property
    def mean_second_order_s(self) -> float:
        """Mean second-order part over the cycle, seconds."""
        return float(np.mean([s.second_order_s for s in self.steps]))

    @property
    def worst_step(self) -> int:
        """Index of the slowest step of the cycle."""
        return int(np.argmax([s.step_time_s for s in self.steps]))

    def mean_per_worker(self, name: str) -> tuple[float, ...]:
        """Mean over the cycle of a per-worker field (busy_s, comm_s or idle_s), seconds."""
        return tuple(float(v) for v in np.mean([getattr(s, name) for s in self.steps], axis=0))

    def mean_phases(self) -> dict[str, tuple[float, ...]]:
        """Mean over the cycle of each phase as each worker's own timer measures it, seconds."""
        return {phase: tuple(float(v) for v in np.mean([s.phases_s[phase] for s in self.steps],
                                                       axis=0))
                for phase in PHASES}


def cycle_length(config: PlanConfig) -> int:
    """Steps after which the pattern of factor and decomposition updates repeats."""
    return math.lcm(config.factor_update_freq, config.inv_update_freq)


def simulate_step(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
                  strategy: Strategy | None = DP_KFAC, step: int = 0,
                  speeds: Sequence[float] | None = None, network: Network | None = None,
                  decomposition_step: Sequence[int] | None = None,
                  trace: bool = True, split: Split | None = None,
                  start: Sequence[float] | None = None) -> StepResult:
    """Simulate step number `step` of `profile` under `strategy` (None: plain SGD) with layer i
    owned by rank owners[i]. decomposition_step[i]: the slot in 0..inv_update_freq-1 of layer
    i's decomposition (None: all at step % inv_update_freq == 0; split layers always 0). trace:
    also find the critical path (False: empty, faster for sweeps). split: layer index -> rows
    of its G side per rank (DP-KFAC only; other strategies ignore it). start: when each worker
    begins, seconds at or below 0 (StepResult.leads of the step before; None: all at 0)."""
    speed = np.asarray(check_speeds(speeds, workers))
    split = applied_split(split, strategy)
    decomposition_step = _unstaggered(decomposition_step, split)
    net = network_of(profile, network)
    line = Timeline(workers, trace=trace, contention=profile.contention, start=start)
    hide_local = overlapped(strategy, config=config, workers=workers)
    from_backward = hide_local or posted_from_backward(profile, config=config, workers=workers)
    began = line.t.copy()
    line.compute("forward_backward", profile.forward_backward_posting_s(from_backward) / speed)
    buckets = bucket_costs(profile, workers=workers, network=network)
    allreduce_s = chained_seconds(buckets)
    broadcast_s = 0.0
    local = dict(profile=profile, strategy=strategy, owners=owners, workers=workers,
                 config=config, step=step, speed=speed, net=net,
                 decomposition_step=decomposition_step)
    if from_backward:
        # the threads start as forward/backward ends, beside the local phases
        line.background("allreduce", buckets_cpu_s(profile, buckets, workers=workers,
                                                   network=network))
        if hide_local:
            _local_phases(line, **local)
        pending = _post_buckets(line, buckets, began)
        line.wait(pending)
        ar_end = pending.end_s
    else:
        line.collective("allreduce", allreduce_s, count=len(buckets))
        ar_end = float(line.t[0])
    if strategy is not None and not hide_local:
        _local_phases(line, **local)
    second_order_end = ar_end
    if strategy is not None:
        broadcast_s = shared_phases(line, profile, strategy=strategy, owners=owners,
                                     workers=workers, slot=step % config.inv_update_freq,
                                     speed=speed, net=net, split=split,
                                     shares_first=config.overlap, network=network)
        second_order_end = float(line.t.max())
        line.compute("apply", profile.apply_s / speed)
    line.compute("optimizer", profile.optimizer_s / speed)
    kfac = sum(line.phases[p] for p in ("factors", "decompose", "precondition"))
    step_time = float(line.t.max())
    return StepResult(
        step_time_s=step_time, second_order_s=second_order_end - ar_end,
        compute_makespan_s=float(kfac.max()),
        allreduce_s=allreduce_s, broadcast_s=broadcast_s,
        busy_s=tuple(line.busy.tolist()), comm_s=tuple(line.comm.tolist()),
        idle_s=tuple(np.maximum(step_time - line.busy - line.comm, 0.0).tolist()),
        critical_path=line.critical_path(),
        phases_s={phase: tuple(line.phases[phase].tolist()) for phase in PHASES},
        precondition_end_s=tuple(line.ends["precondition"].tolist())
        if "precondition" in line.ends else (),
        end_s=tuple(line.t.tolist()))


def overlapped(strategy: Strategy | None, *, config: PlanConfig, workers: int) -> bool:
    """Whether the executor overlaps this step's local work with the gradient all-reduce."""
    return (config.overlap and workers > 1 and strategy is not None
            and strategy.factors is FactorMode.LOCAL)


def posted_from_backward(profile: Profile, *, config: PlanConfig, workers: int) -> bool:
    """Whether the gradient buckets' all-reduces go out during backward for every strategy:
    the executor does so unless --no-overlap; modelled only for a profile that records its
    buckets (one without them keeps the fused all-reduce after forward/backward)."""
    return config.overlap and workers > 1 and bool(profile.gradient_buckets)


def _post_buckets(line: Timeline, buckets: Sequence[BucketCost], began: np.ndarray
                  ) -> Segment:
    """Post the buckets' all-reduces as a chain (buckets.bucket_chain): bucket i once the
    slowest worker has it ready (its ready fraction of that worker's forward/backward, which
    began at `began`) and bucket i-1 is done. The chain's last unbroken run is the posted
    segment."""
    ends = line.phase_end("forward_backward")
    ready = [began + b.ready * (ends - began) for b in buckets]
    chain = bucket_chain([float(r.max()) for r in ready], [b.seconds for b in buckets],
                         [b.chained_s for b in buckets])
    return line.post_at("allreduce", start_s=chain.start_s, end_s=chain.end_s,
                        gate=int(np.argmax(ready[chain.first])),
                        count=len(buckets) - chain.first)


def _local_phases(line: Timeline, *, profile: Profile, strategy: Strategy,
                  owners: Sequence[int], workers: int, config: PlanConfig, step: int,
                  speed: np.ndarray, net: Network,
                  decomposition_step: Sequence[int] | None) -> None:
    """Factors (and their all-reduce when ALLREDUCED) and decompositions of one step."""
    layers = profile.layers
    owned = np.bincount(np.asarray(owners, dtype=int), minlength=workers)
    slot = step % config.inv_update_freq
    slots = decomposition_step if decomposition_step is not None else (0,) * len(layers)
    decomposing = [slots[i] % config.inv_update_freq == slot for i in range(len(layers))]
    if step % config.factor_update_freq == 0:
        if strategy.factors is FactorMode.LOCAL:
            work, counts = per_owner([l.factor_s for l in layers], owners, workers), owned
        else:
            work, counts = np.full(workers, sum(l.factor_s for l in layers)), [len(layers)] * workers
        line.compute("factors", work / speed, counts)
        if strategy.factors is FactorMode.ALLREDUCED and workers > 1:
            nbytes = sum(factor_bytes(l, dtype_bytes=profile.dtype_bytes) for l in layers)
            line.collective("factor_allreduce", net.allreduce_s(ranks=workers, nbytes=nbytes))
    due = [l.decompose_s if d else 0.0 for l, d in zip(layers, decomposing)]
    line.compute("decompose", per_owner(due, owners, workers) / speed,
                 per_owner([float(d) for d in decomposing], owners, workers))


def _unstaggered(decomposition_step: Sequence[int] | None, split: Split
                 ) -> Sequence[int] | None:
    """The decomposition slots with every split layer's at 0 (split layers are never
    staggered: their decompositions go out in one fused broadcast per cycle)."""
    if decomposition_step is None or not split:
        return decomposition_step
    return tuple(0 if i in split else int(k) for i, k in enumerate(decomposition_step))


def simulate_cycle(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
                   strategy: Strategy | None = DP_KFAC, speeds: Sequence[float] | None = None,
                   network: Network | None = None,
                   decomposition_step: Sequence[int] | None = None,
                   trace: bool = True, split: Split | None = None) -> CycleResult:
    """Simulate the steps 0 .. cycle_length(config)-1 in steady state (steps of the same kind
    from the same start only once); trace and split as simulate_step's. A worker done with a
    step early (a broadcast's root) begins the next one early (StepResult.leads): one untraced
    pass over the cycle finds how the last step leaves the workers, the cycle then runs
    from there."""
    memo: dict[tuple, StepResult] = {}

    def run(k: int, start: np.ndarray, traced: bool) -> StepResult:
        slot = k % config.inv_update_freq
        key = (k % config.factor_update_freq == 0,
               slot if decomposition_step is not None else int(slot == 0),
               tuple(np.round(start, 12)), traced)
        if key not in memo:
            memo[key] = simulate_step(profile, owners=owners, workers=workers, config=config,
                                      strategy=strategy, step=k, speeds=speeds, network=network,
                                      decomposition_step=decomposition_step, trace=traced,
                                      split=split, start=start)
        return memo[key]

    start = np.zeros(workers)
    for k in range(cycle_length(config)):
        start = run(k, start, False).leads()
    steps = []
    for k in range(cycle_length(config)):
        steps.append(run(k, start, trace))
        start = steps[-1].leads()
    return CycleResult(steps=tuple(steps))
