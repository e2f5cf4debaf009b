"""One simulated step's timeline: per-worker clocks, the segments they ran, collectives as
barriers (or posted and waited for), and, for ranks that share a host, compute laid out by
processor sharing (planner.model.sharing). Seconds throughout."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from dpkfac.core.profile import Contention
from dpkfac.core.step import PHASES
from planner.model.sharing import shared_chunk_ends


@dataclass(frozen=True)
class Segment:
    """One stretch of the timeline: `kind` on `worker` (None: a collective of all workers),
    covering `layers` layers (0 when not per layer) or `count` collectives (posted together or
    run one after another), from start_s to end_s seconds."""
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


class Timeline:
    """Per-worker clocks and segments of one step; collectives are barriers, except that a
    worker may leave a posted one at its own end (wait's `until`: a broadcast's root)."""

    def __init__(self, workers: int, *, trace: bool, contention: Contention | None = None,
                 start: Sequence[float] | None = None) -> None:
        self.trace = trace  # record segments for the critical path
        # each worker's clock when it begins the step (0; earlier, below 0, for a worker that
        # ended the step before early)
        self._t = np.zeros(workers) if start is None else np.array(start, dtype=float)
        # with contention, compute between two collectives is held here, then laid out at
        # the speeds processor sharing gives (settle)
        self.contention = contention if contention and contention.applies(workers) else None
        self._held: list[tuple[str, np.ndarray, Sequence[int] | None]] = []
        self._background: np.ndarray | None = None  # collective threads' CPU seconds, held
        self._background_start = self._t  # and when each thread starts
        self._background_after = 0  # after how many held compute phases of its worker
        self._background_end = 0.0  # when the last collective thread's CPU work ended
        self.segments: list[list[Segment]] = [[] for _ in range(workers)]
        self.phases = {phase: np.zeros(workers) for phase in PHASES}
        self.last: dict[str, np.ndarray] = {}  # each phase's seconds when last laid out
        self.ends: dict[str, np.ndarray] = {}  # and each worker's clock at its end
        self.busy = np.zeros(workers)
        self.comm = np.zeros(workers)
        # id(collective segment) -> (the worker that arrived last, the segment to resume from
        # in its list): the collective itself, or the zero-length marker (never on a path)
        # where that worker posted an overlapped one
        self.gates: dict[int, tuple[int, Segment]] = {}

    @property
    def t(self) -> np.ndarray:
        """Each worker's clock, seconds (held compute laid out first)."""
        self._settle()
        return self._t

    def phase_end(self, phase: str) -> np.ndarray:
        """Each worker's clock when its `phase` last ended (held compute laid out first)."""
        self._settle()
        return self.ends[phase]

    def compute(self, phase: str, seconds: np.ndarray, layers: Sequence[int] | None = None) -> None:
        """Every worker w computes `seconds[w]` (busy figures) in `phase`."""
        if self.contention is not None:
            self._held.append((phase, np.asarray(seconds, dtype=float), layers))
        else:
            self._lay_out(phase, seconds, layers)

    def background(self, phase: str, seconds: float, *, start_s: float | None = None) -> None:
        """Each worker's collective thread works `seconds` of CPU once the worker is done with
        the compute given so far, or from `start_s` if later (an overlapped collective's hosts'
        part; start_s: when the collective starts, once the last rank has posted it). With
        contention it shares the cores with the compute, that compute and what is given after
        it laid out together, and a wait() for the collective ends no earlier than it;
        without, it runs as compute before the worker's own (a host with no core to spare)."""
        if self.contention is None:
            self._lay_out(phase, np.full(len(self._t), seconds), None)
            return
        if self._background is not None:
            self._settle()
        self._background = np.full(len(self._t), seconds)
        self._background_start = (self._t if start_s is None
                                  else np.maximum(self._t, start_s))
        self._background_after = len(self._held)

    def _settle(self) -> None:
        """Lay out the held compute: each worker's phases, one after another, at the speed
        that sharing the host with the others computing (collective threads included) gives
        them from moment to moment."""
        if not self._held and self._background is None:
            return
        held, self._held = self._held, []
        workers = len(self._t)
        chunks = (np.stack([np.broadcast_to(s, (workers,)) for _, s, _ in held], axis=1)
                  if held else np.zeros((workers, 0)))
        threads = self._background if self._background is not None else np.zeros(workers)
        ends, thread_ends = shared_chunk_ends(
            self._t, chunks, self.contention.time_factor, threads=threads,
            thread_starts=self._background_start if self._background is not None else self._t,
            thread_after=self._background_after)
        self._background, self._background_after = None, 0
        self._background_end = float(thread_ends.max())
        for k, (phase, _, layers) in enumerate(held):
            self._lay_out(phase, ends[:, k] - self._t, layers)

    def _lay_out(self, phase: str, seconds: np.ndarray, layers: Sequence[int] | None) -> None:
        for w, s in enumerate(seconds if self.trace else ()):
            if s > 0:
                n = 0 if layers is None else int(layers[w])
                self.segments[w].append(Segment(phase, w, float(self._t[w]),
                                                float(self._t[w] + s), layers=n))
        self._t = self._t + seconds
        self.last[phase] = np.asarray(seconds, dtype=float)
        self.ends[phase] = self._t
        self.phases[phase] += seconds
        self.busy += seconds

    def collective(self, phase: str, seconds: float, *, count: int = 1) -> None:
        """A collective of all workers taking `seconds` once the last one has arrived."""
        gate = int(np.argmax(self.t))
        start = float(self.t[gate])
        seg = Segment(phase, None, start, start + seconds, count=count)
        self.gates[id(seg)] = (gate, seg)
        for w in range(len(self.t) if self.trace else 0):
            self.segments[w].append(seg)
        self.phases[phase] += start + seconds - self.t
        self.comm += seconds
        self._t = np.full_like(self.t, start + seconds)

    def post(self, phase: str, seconds: float) -> Segment:
        """An overlapped collective of all workers taking `seconds` once the last one has
        posted it; the workers go on computing until they wait() for it."""
        gate = int(np.argmax(self.t))
        start = float(self.t[gate])
        return self.post_at(phase, start_s=start, end_s=start + seconds, gate=gate)

    def post_at(self, phase: str, *, start_s: float, end_s: float, gate: int,
                count: int = 1) -> Segment:
        """An overlapped collective (or `count` of them, run back to back) running from
        `start_s`, no later than now, when worker `gate` posted it last (e.g. from inside its
        backward), to `end_s`; the workers go on computing until they wait() for it. For the
        critical path, the gate's segment running at `start_s` is cut there."""
        seg = Segment(phase, None, start_s, end_s, count=count)
        marker = Segment(phase, gate, start_s, start_s)
        self.gates[id(seg)] = (gate, marker)
        if self.trace:
            self._insert(gate, marker)
        return seg

    def _insert(self, worker: int, marker: Segment) -> None:
        """Put the zero-length `marker` into `worker`'s segments at its time, cutting the
        worker's own segment that runs across it in two."""
        segments, at = self.segments[worker], marker.start_s
        for k in range(len(segments) - 1, -1, -1):
            seg = segments[k]
            if seg.end_s <= at or seg.worker is None:
                segments.insert(k + 1, marker)
                return
            if seg.start_s < at:
                segments[k:k + 1] = [replace(seg, end_s=at), marker, replace(seg, start_s=at)]
                return
        segments.insert(0, marker)

    def _ending_at(self, seg: Segment, end_s: float) -> Segment:
        """The posted collective `seg` ending at `end_s` instead, with the same gate."""
        late = replace(seg, end_s=end_s)
        self.gates[id(late)] = self.gates[id(seg)]
        return late

    def wait(self, seg: Segment, *, comm_max_s: float | None = None,
             until: np.ndarray | None = None) -> None:
        """Every worker waits for the posted collective `seg` (its phase's timer, and its comm
        seconds, run from the worker's arrival to the collective's end: the rest was hidden;
        with `comm_max_s`, comm at most that: the collectives' own seconds, the rest of the
        wait idle). `until`: each worker's own end, where it is earlier than the collective's
        (a broadcast's root, done once its bytes are in its sockets' buffers)."""
        self._settle()  # lay out the held compute and the threads before reading their end
        if self._background_end > seg.end_s:  # its threads' CPU work ended later
            seg = self._ending_at(seg, self._background_end)
        self._background_end = 0.0
        ends = np.full(len(self.t), seg.end_s) if until is None else np.minimum(until, seg.end_s)
        for w in range(len(self.t) if self.trace else 0):
            if ends[w] < seg.end_s:  # its own share: no collective to follow back from here
                if ends[w] > self.t[w]:
                    self.segments[w].append(Segment(seg.kind, w, float(self.t[w]),
                                                    float(ends[w])))
            elif seg.end_s >= self.t[w]:
                self.segments[w].append(seg)
        waited = np.maximum(ends - self.t, 0.0)
        self.phases[seg.kind] += waited
        self.comm += waited if comm_max_s is None else np.minimum(waited, comm_max_s)
        self._t = np.maximum(self.t, ends)

    def critical_path(self) -> tuple[Segment, ...]:
        """Walk back from the worker that ends last, through each collective to the worker
        whose arrival started it (empty without a trace)."""
        if not self.trace:
            return ()
        w = int(np.argmax(self.t))
        i, path = len(self.segments[w]) - 1, []
        while i >= 0:
            seg = self.segments[w][i]
            if seg.end_s > seg.start_s:
                path.append(seg)
            if seg.worker is None:  # continue on the worker whose arrival started it
                w, resume = self.gates[id(seg)]
                i = next(k for k, s in enumerate(self.segments[w]) if s is resume)
            i -= 1
        return tuple(reversed(path))
