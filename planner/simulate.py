"""Event-level simulation of DP-KFAC training steps under a placement, as the executor runs them.

One step, on every worker w (times divided by w's speed; seconds):

1. forward/backward;
2. the gradient all-reduce, which starts when the slowest worker has finished step 1
   (executor/train.py all-reduces before the preconditioner);
3. the preconditioner's phases over w's own layers in layer order (executor/preconditioner.py):
   factor construction of every owned layer (on steps where step % factor_update_freq == 0),
   then decompositions (every owned layer on steps where step % inv_update_freq == 0, or, with a
   staggered `decomposition_step` schedule, the layers whose slot is step % inv_update_freq),
   then preconditioning of every owned layer;
4. one fused broadcast per owner, issued by every rank in rank order: each broadcast goes onto
   one shared network (they serialise in rank order) and cannot start before its owner has
   finished step 3. In "collective" mode (the executor today) a broadcast also needs every rank
   to have posted it, and a rank posts all its broadcasts only once its own step 3 is done, so
   the broadcasts start when the slowest rank is done, all posted together, and take
   Network.broadcast_group_s of their times (spread over the backend's measured overlap); in
   "owner" mode (an executor that posts receives early) each starts as soon as its owner is
   done and the network is free;
5. every rank waits for all broadcasts, then runs the optimizer.

The step ends when the last worker finishes its optimizer. A cycle is lcm(factor_update_freq,
inv_update_freq) steps; the mean step over the cycle is the placement's predicted step time.
Per worker: busy (computing), comm (in a collective, not computing) and idle (waiting) seconds.
The critical path is the chain of segments that set the step's end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .comm import Network
from .costmodel import PlanConfig, gradient_allreduce_s, network_of, owner_broadcasts_s
from .instance import check_speeds
from .profile import Profile

BROADCAST_MODES = ("collective", "owner")


@dataclass(frozen=True)
class Segment:
    """One stretch of the timeline: `kind` on `worker` (None: all workers / the network),
    covering `layers` layers (0 when not per layer) or `count` back-to-back operations (e.g.
    broadcasts of several owners), from start_s to end_s seconds."""
    kind: str
    worker: int | None
    start_s: float
    end_s: float
    layers: int = 0
    count: int = 1

    def as_dict(self) -> dict:
        """Plain-data form for the placement file."""
        return {"kind": self.kind, "worker": self.worker, "layers": self.layers,
                "count": self.count, "start_s": self.start_s, "end_s": self.end_s}


@dataclass(frozen=True)
class StepResult:
    """One simulated step. Seconds; per-worker tuples by rank.

    second_order_s: from the end of the gradient all-reduce to the end of the last broadcast.
    compute_makespan_s: the largest per-worker K-FAC compute of this step.
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
    phases_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # per phase, per worker


# The executor's measured phases (metrics.jsonl keys without "_s"), in step order.
PHASES = ("forward_backward", "allreduce", "factors", "decompose", "precondition", "broadcast",
          "apply", "optimizer")


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

    def mean_per_worker(self, field: str) -> tuple[float, ...]:
        """Mean over the cycle of a per-worker field (busy_s, comm_s or idle_s), seconds."""
        return tuple(float(v) for v in np.mean([getattr(s, field) for s in self.steps], axis=0))

    def mean_phases(self) -> dict[str, tuple[float, ...]]:
        """Mean over the cycle of each phase as each worker's own timer would measure it
        (waiting included: the all-reduce waits for the slowest forward/backward, the broadcast
        phase waits for the slowest owner), seconds per worker."""
        return {phase: tuple(float(v) for v in np.mean([s.phases_s[phase] for s in self.steps],
                                                       axis=0))
                for phase in PHASES}


def cycle_length(config: PlanConfig) -> int:
    """Steps after which the pattern of factor and decomposition updates repeats."""
    return math.lcm(config.factor_update_freq, config.inv_update_freq)


def simulate_step(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
                  step: int = 0, speeds: Sequence[float] | None = None,
                  network: Network | None = None,
                  decomposition_step: Mapping[int, int] | Sequence[int] | None = None,
                  broadcast_mode: str = "collective") -> StepResult:
    """Simulate step number `step` (0-based from the start of training) of `profile` with layer
    i owned by rank owners[i]. decomposition_step[i]: the slot in 0..inv_update_freq-1 of layer
    i's decomposition (None: the executor's rule, all at step % inv_update_freq == 0)."""
    if broadcast_mode not in BROADCAST_MODES:
        raise ValueError(f"broadcast_mode must be one of {BROADCAST_MODES}")
    speeds = check_speeds(speeds, workers)
    layers = profile.layers
    factors_due = step % config.factor_update_freq == 0
    slot = step % config.inv_update_freq
    phase_work = np.zeros((workers, 3))  # factors, decompose, precondition (at speed 1)
    counts = np.zeros((workers, 3), dtype=int)
    for i, (layer, owner) in enumerate(zip(layers, owners)):
        due = slot == 0 if decomposition_step is None else decomposition_step[i] == slot
        if factors_due:
            phase_work[owner, 0] += layer.factor_s
            counts[owner, 0] += 1
        if due:
            phase_work[owner, 1] += layer.decompose_s
            counts[owner, 1] += 1
        phase_work[owner, 2] += layer.precondition_s
        counts[owner, 2] += 1
    speed = np.asarray(speeds)
    phase_s = phase_work / speed[:, None]
    fb = profile.forward_backward_s / speed
    opt = profile.optimizer_s / speed
    allreduce = gradient_allreduce_s(profile, workers=workers, network=network)
    ar_start = float(fb.max())
    ar_end = ar_start + allreduce
    finish = ar_end + phase_s.sum(axis=1)

    # broadcasts, in rank order, on one network; posted together they share its lanes
    sizes = owner_broadcasts_s(profile, owners=owners, workers=workers, network=network)
    if broadcast_mode == "collective" and sum(sizes) > 0:
        stretch = network_of(profile, network).broadcast_group_s(sizes) / sum(sizes)
        sizes = tuple(t * stretch for t in sizes)
    has_layers = np.bincount(np.asarray(owners, dtype=int), minlength=workers) > 0
    posted = float(finish.max())
    bcasts: list[tuple[int, float, float, str]] = []  # (src, start, end, cause)
    net_free = -math.inf
    if workers > 1:
        for src in range(workers):
            if not has_layers[src]:
                continue
            ready = float(finish[src]) if broadcast_mode == "owner" else max(float(finish[src]),
                                                                            posted)
            cause = "network" if net_free > ready else "ready"
            start = max(ready, net_free)
            net_free = start + sizes[src]
            bcasts.append((src, start, net_free, cause))
    done = np.full(workers, bcasts[-1][2]) if bcasts else finish.copy()
    apply = np.full(workers, profile.apply_s) / speed
    end = done + apply + opt
    step_time = float(end.max())

    busy = fb + phase_s.sum(axis=1) + apply + opt
    comm = allreduce + _covered(bcasts, lo=finish, hi=done)
    idle = step_time - busy - comm
    path = _critical_path(fb=fb, ar_start=ar_start, ar_end=ar_end, phase_s=phase_s, counts=counts,
                          finish=finish, bcasts=bcasts, done=done, end=end,
                          mode=broadcast_mode)
    return StepResult(step_time_s=step_time, second_order_s=float(done.max()) - ar_end,
                      compute_makespan_s=float(phase_s.sum(axis=1).max()),
                      allreduce_s=allreduce, broadcast_s=float(sum(sizes)),
                      busy_s=tuple(busy.tolist()), comm_s=tuple(comm.tolist()),
                      idle_s=tuple(np.maximum(idle, 0.0).tolist()), critical_path=path,
                      phases_s=_phases(fb=fb, ar_end=ar_end, phase_s=phase_s, finish=finish,
                                       done=done, apply=apply, opt=opt))


def _phases(*, fb, ar_end, phase_s, finish, done, apply, opt) -> dict[str, tuple[float, ...]]:
    """Per worker, the seconds each of the executor's phase timers covers in this step."""
    as_tuple = lambda a: tuple(float(v) for v in a)  # noqa: E731
    return {"forward_backward": as_tuple(fb), "allreduce": as_tuple(ar_end - fb),
            "factors": as_tuple(phase_s[:, 0]), "decompose": as_tuple(phase_s[:, 1]),
            "precondition": as_tuple(phase_s[:, 2]), "broadcast": as_tuple(done - finish),
            "apply": as_tuple(apply), "optimizer": as_tuple(opt)}


def simulate_cycle(profile: Profile, *, owners: Sequence[int], workers: int, config: PlanConfig,
                   speeds: Sequence[float] | None = None, network: Network | None = None,
                   decomposition_step: Mapping[int, int] | Sequence[int] | None = None,
                   broadcast_mode: str = "collective") -> CycleResult:
    """Simulate the steps 0 .. cycle_length(config)-1 (steps of the same kind only once)."""
    memo: dict[tuple[bool, int], StepResult] = {}
    steps = []
    for k in range(cycle_length(config)):
        slot = k % config.inv_update_freq
        key = (k % config.factor_update_freq == 0,
               slot if decomposition_step is not None else int(slot == 0))
        if key not in memo:
            memo[key] = simulate_step(profile, owners=owners, workers=workers, config=config,
                                      step=k, speeds=speeds, network=network,
                                      decomposition_step=decomposition_step,
                                      broadcast_mode=broadcast_mode)
        steps.append(memo[key])
    return CycleResult(steps=tuple(steps))


def _covered(bcasts, *, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per worker, seconds of broadcasting inside [lo_w, hi_w] (broadcasts are disjoint)."""
    if not bcasts:
        return np.zeros_like(lo)
    starts = np.array([b[1] for b in bcasts])
    ends = np.array([b[2] for b in bcasts])
    overlap = np.minimum(ends[None, :], hi[:, None]) - np.maximum(starts[None, :], lo[:, None])
    return np.clip(overlap, 0.0, None).sum(axis=1)


_PHASES = ("factors", "decompose", "precondition")


def _critical_path(*, fb, ar_start, ar_end, phase_s, counts, finish, bcasts, done, end,
                   mode) -> tuple[Segment, ...]:
    """Walk back from the worker that ends last: optimizer, the broadcasts chained on the
    network, the compute of the worker whose finish released them, the all-reduce, and the
    slowest forward/backward."""
    last = int(np.argmax(end))
    path = [Segment("optimizer", last, float(done[last]), float(end[last]))]
    gate = last
    if bcasts:
        chain = []
        for src, start, stop, cause in reversed(bcasts):
            if chain and stop < chain[-1].start_s - 1e-15:
                continue
            chain.append(Segment("broadcast", src, start, stop))
            if cause == "ready":
                gate = src if mode == "owner" else int(np.argmax(finish))
                break
        if len(chain) > 3:  # back-to-back broadcasts of many owners: one segment
            chain = [Segment("broadcast", None, chain[-1].start_s, chain[0].end_s,
                             count=len(chain))]
        path.extend(chain)
    t = float(finish[gate])
    for phase in reversed(range(3)):
        if phase_s[gate, phase] > 0:
            path.append(Segment(_PHASES[phase], gate, t - float(phase_s[gate, phase]), t,
                                layers=int(counts[gate, phase])))
            t -= float(phase_s[gate, phase])
    if ar_end > ar_start:
        path.append(Segment("allreduce", None, ar_start, ar_end))
    slow = int(np.argmax(fb))
    path.append(Segment("forward_backward", slow, 0.0, float(fb[slow])))
    return tuple(reversed(path))
