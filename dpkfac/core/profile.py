"""The profile file (schema dpkfac.profile/1) as plain frozen data."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .errors import InputError
from .jsonio import read_json, validate
from .schemas import PROFILE_SCHEMA, PROFILE_SCHEMA_ID
from .units import TCP_REVERSE_ACK_SHARE


@dataclass(frozen=True)
class LayerCost:
    """Measured costs of one K-FAC layer on its owner. Times in seconds, sizes in elements/bytes."""
    name: str
    kind: str
    dim_a: int
    dim_g: int
    grad_numel: int
    factor_a_s: float
    factor_g_s: float
    decompose_a_s: float
    decompose_g_s: float
    precondition_s: float
    state_bytes: int

    @property
    def factor_s(self) -> float:
        """One construction of both factors, seconds."""
        return self.factor_a_s + self.factor_g_s

    @property
    def decompose_s(self) -> float:
        """One decomposition of both factors, seconds."""
        return self.decompose_a_s + self.decompose_g_s


@dataclass(frozen=True)
class AlphaBeta:
    """Hockney cost of one collective: alpha_s + nbytes * beta_s_per_byte seconds."""
    alpha_s: float
    beta_s_per_byte: float

    def time(self, nbytes: float) -> float:
        """Seconds to move `nbytes` bytes in one call."""
        return self.alpha_s + nbytes * self.beta_s_per_byte

    def scaled(self, factor: float) -> "AlphaBeta":
        """Both terms times `factor`."""
        return AlphaBeta(alpha_s=self.alpha_s * factor,
                         beta_s_per_byte=self.beta_s_per_byte * factor)


@dataclass(frozen=True)
class MeasuredPoints:
    """Measured seconds of one collective call at ascending message sizes (bytes).

    Real collectives are not one straight line over 1 KiB..64 MiB (gloo switches algorithms
    with the size, so a least-squares alpha-beta line can be off by 30% or more at the sizes a
    model sends); the measured points keep the curve's shape.
    """
    message_bytes: tuple[int, ...]
    seconds: tuple[float, ...]

    def time(self, nbytes: float, *, beyond_s_per_byte: float) -> float:
        """Seconds for `nbytes` bytes: linear between measured sizes, the smallest size's time
        below them, and beyond the largest `beyond_s_per_byte` per extra byte."""
        sizes, times = self.message_bytes, self.seconds
        if nbytes > sizes[-1]:
            return times[-1] + (nbytes - sizes[-1]) * beyond_s_per_byte
        return float(np.interp(nbytes, sizes, times))

    def floor_s(self, nbytes: float) -> float:
        """The least time of any call of at most `nbytes` bytes (a proven lower bound on each:
        the interpolation is piecewise linear, so its minimum sits at a measured size or at
        `nbytes`)."""
        inside = [t for b, t in zip(self.message_bytes, self.seconds) if b <= nbytes]
        return min([float(np.interp(nbytes, self.message_bytes, self.seconds)), *inside])

    def scaled(self, factor: float) -> "MeasuredPoints":
        """Every time multiplied by `factor`."""
        return MeasuredPoints(self.message_bytes, tuple(t * factor for t in self.seconds))

    def faster_link(self, scale: float, *, wire_s_per_byte: float | None = None,
                    host_s_per_byte: float | None = None,
                    burst_s: float = 0.0) -> "MeasuredPoints":
        """The curve on a link `scale` times the bandwidth, never below the latency floor (the
        least measured time: wake-up, protocol, what no bandwidth shortens).

        With `wire_s_per_byte` (seconds per message byte the link itself takes, known from
        its rate), a call waited for the wire max(0, bytes * wire_s_per_byte - burst_s)
        seconds (`burst_s`: the link's token bucket, seconds of its rate that leave at once
        after an idle link, the same at every rate: a shaped link's burst). A call that
        waited shrinks in proportion to its wait at the faster rate: what it took beyond the
        wait is the transfer's too (TCP's ramp and queue on the link; on this project's
        emulated links a 4 MiB all-reduce took 7 ms more than its wait at 100 Mbit/s, 0.1 ms
        at 400) and its latency ran under the transfer. A call that did not wait keeps its
        time, plus the wait a slower link adds. Without `wire_s_per_byte`, all of the time
        above the floor is divided by `scale`.
        With `host_s_per_byte` (the hosts' CPU seconds per byte, measured), the time above
        the floor never drops below that much of it (at most what was measured): on a slow
        link the hosts' work runs under the transfer of the chunks before, on a fast one it is
        what remains."""
        floor = min(self.seconds)
        out = []
        for n, t in zip(self.message_bytes, self.seconds):
            host = 0.0 if host_s_per_byte is None else min(n * host_s_per_byte,
                                                            max(t - floor, 0.0))
            faster = self._faster_s(n, t, floor, scale, wire_s_per_byte, burst_s)
            out.append(max(floor + host, faster))
        return MeasuredPoints(self.message_bytes, tuple(out))

    @staticmethod
    def _faster_s(nbytes: int, seconds: float, floor_s: float, scale: float,
                  wire_s_per_byte: float | None, burst_s: float) -> float:
        """A call's measured `seconds` on a link `scale` times as fast (faster_link's rule,
        before its bounds)."""
        if wire_s_per_byte is None:
            return floor_s + max(seconds - floor_s, 0.0) / scale
        waited = max(nbytes * wire_s_per_byte - burst_s, 0.0)
        faster = max(nbytes * wire_s_per_byte / scale - burst_s, 0.0)
        if waited > 0.0:
            return seconds * faster / waited
        return seconds + faster


@dataclass(frozen=True)
class CommCosts:
    """Collective costs measured (or assumed) at `world_size` ranks: an alpha-beta fit of each
    collective and, when measured, the points it was fitted to. `notes`: the file's other comm
    fields (source, fit errors), kept as they are."""
    backend: str
    world_size: int
    allreduce: AlphaBeta
    broadcast: AlphaBeta
    allreduce_points: MeasuredPoints | None = None
    broadcast_points: MeasuredPoints | None = None
    # a broadcast's root: its own seconds from the last rank's post to its return (median)
    broadcast_root_points: MeasuredPoints | None = None
    broadcast_overlap: float = 1.0  # broadcasts posted together that progress at once
    link_bytes_per_s: float | None = None  # the links' payload rate, when the profile was told it
    link_burst_s: float = 0.0  # the links' token bucket, seconds of their rate (shaped links)
    link_idle_s: float | None = None  # seconds the link idled before each timed call (compute)
    gradient_allreduce_cpu_s: float | None = None  # the CPU seconds of the gradient all-reduce
    gradient_buckets_s: float | None = None  # the step's bucket all-reduces posted back to back
    notes: dict = field(default_factory=dict, compare=False)

    def wire_s_per_byte(self, kind: str) -> float | None:
        """Seconds per message byte a collective of `kind` spends on the wire at the measured
        rank count p (ring all-reduce: each rank sends 2 (p-1)/p of the message, on a link
        that also carries the ACKs of what it receives, TCP_REVERSE_ACK_SHARE; broadcast: the
        root sends it to p-1 ranks); None when the link rate is unknown."""
        if self.link_bytes_per_s is None:
            return None
        p = self.world_size
        per_byte = (2 * (p - 1) / p * (1 + TCP_REVERSE_ACK_SHARE) if kind == "allreduce"
                    else float(p - 1))
        return per_byte / self.link_bytes_per_s

    def refilled_burst_s(self) -> float:
        """Seconds of the link's rate its token bucket held as each timed call started: the
        burst, at most what refilled while the link idled before the call (link_idle_s, the
        compute the call followed; the call before it had drained the bucket). The same at
        any rate: an idle second refills a second of the rate."""
        idle = self.link_idle_s
        return self.link_burst_s if idle is None else min(self.link_burst_s, idle)

    def scaled(self, *, allreduce: float, broadcast: float) -> "CommCosts":
        """Every all-reduce time times `allreduce`, every broadcast time times `broadcast`."""
        scale = lambda points, f: None if points is None else points.scaled(f)  # noqa: E731
        chain = self.gradient_buckets_s
        return replace(self, allreduce=self.allreduce.scaled(allreduce),
                       gradient_buckets_s=None if chain is None else chain * allreduce,
                       broadcast=self.broadcast.scaled(broadcast),
                       allreduce_points=scale(self.allreduce_points, allreduce),
                       broadcast_points=scale(self.broadcast_points, broadcast),
                       broadcast_root_points=scale(self.broadcast_root_points, broadcast))


@dataclass(frozen=True)
class Contention:
    """How ranks that share a host slow one another's kernels. Measured with `ranks` ranks
    timing kernels at once (the figures a profile's layers and step hold: the "busy" figures),
    the K-FAC kernels took `slowdown` times as long as on one rank computing alone; `cores`,
    when every rank ran on one host, its CPU cores (None: unknown, or several hosts).

    Model: the ranks share c = ranks / slowdown cores, at most `cores` (the profile's ranks
    never all computed at once throughout, so ranks / slowdown can exceed the host's cores),
    so with k of them computing at once each runs at min(1, c / k) of its alone speed; a
    kernel then takes time_factor(k) times its busy figure (1 at k = ranks when c is not
    capped, less when fewer compute). A slowdown at or below 1 on a host with a core per rank
    (a GPU per rank) means no contention: every factor is 1."""
    ranks: int
    slowdown: float
    cores: int | None = None

    def applies(self, workers: int) -> bool:
        """Whether a step of `workers` workers sees it: the profiled world size, and a
        slowdown above 1 or fewer cores than ranks (other world sizes keep the busy figures:
        their hosts are unknown)."""
        crowded = self.cores is not None and self.cores < self.ranks
        return workers == self.ranks and (self.slowdown > 1.0 or crowded)

    def time_factor(self, computing: int) -> float:
        """A kernel's time with `computing` ranks computing at once, over its busy figure."""
        slowdown = max(self.slowdown, 1.0)
        shared = self.ranks / slowdown
        if self.cores is not None:
            shared = min(shared, float(self.cores))
        return max(1.0, computing / shared) / slowdown


@dataclass(frozen=True)
class GradientBucket:
    """One gradient all-reduce bucket as profiled (see dpkfac.core.buckets): `bytes`, its
    gradients' bytes (the loss scalar excluded); `ready_s`, seconds from the start of the
    step's forward to the moment its last gradient was accumulated (mean over the profiled
    steps, on the profiling rank)."""
    bytes: int
    ready_s: float

    def scaled(self, factor: float) -> "GradientBucket":
        """The bucket with its ready time times `factor` (forward/backward rescaled)."""
        return GradientBucket(bytes=self.bytes, ready_s=self.ready_s * factor)


@dataclass(frozen=True)
class Profile:
    """One model's measured K-FAC costs at one per-worker batch size."""
    model: str
    batch_size: int
    device: str
    dtype: str
    compute_method: str
    measured: bool
    layers: tuple[LayerCost, ...]
    forward_backward_s: float
    optimizer_s: float
    comm: CommCosts
    pack_s: float = 0.0   # local part of the gradient all-reduce (flatten, average, copy back)
    apply_s: float = 0.0  # KL clip and writing the preconditioned gradients back, every rank
    contention: Contention | None = None  # measured under torchrun with > 1 rank
    # The gradient all-reduce buckets in posting order; empty: one fused all-reduce posted at
    # the end of forward/backward (profiles written before buckets existed).
    gradient_buckets: tuple[GradientBucket, ...] = ()
    # seconds the buckets' all-reduces, posted from backward, add to forward/backward (their
    # posting and collective threads beside it); 0 where not measured (one rank, older files)
    backward_allreduce_s: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the profiled dtype."""
        return {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}[self.dtype]

    @property
    def grad_bytes(self) -> int:
        """Bytes of all K-FAC layers' gradients (what each broadcast round moves in total)."""
        return sum(layer.grad_numel for layer in self.layers) * self.dtype_bytes

    @property
    def model_grad_bytes(self) -> int:
        """Bytes of the whole model's gradient (what the gradient all-reduce moves)."""
        return int(self.extra.get("model_grad_numel", sum(l.grad_numel for l in self.layers))) * self.dtype_bytes

    def forward_backward_scaled(self, factor: float) -> "Profile":
        """The profile with forward/backward `factor` times as long; every gradient bucket's
        ready time and backward_allreduce_s scale by the same factor."""
        return replace(self, forward_backward_s=self.forward_backward_s * factor,
                       backward_allreduce_s=self.backward_allreduce_s * factor,
                       gradient_buckets=tuple(b.scaled(factor) for b in self.gradient_buckets))

    def forward_backward_posting_s(self, from_backward: bool) -> float:
        """Forward/backward seconds with the gradient buckets posted from backward (`from_
        backward`) or after it."""
        return self.forward_backward_s + (self.backward_allreduce_s if from_backward else 0.0)


_KNOWN_KEYS = {"schema", "model", "batch_size", "device", "dtype", "compute_method", "measured",
               "layers", "step", "comm", "contention"}


def profile_from_dict(doc: Any, *, source: str = "profile") -> Profile:
    """Validate a parsed profile document and build a Profile."""
    if isinstance(doc, dict) and doc.get("schema") not in (None, PROFILE_SCHEMA_ID):
        raise InputError(f"{source}: field schema: expected {PROFILE_SCHEMA_ID!r}, "
                         f"got {doc.get('schema')!r}")
    validate(doc, PROFILE_SCHEMA, source=source)
    names = [layer["name"] for layer in doc["layers"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{source}: field layers: duplicate layer name {dupes[0]!r}")
    layers = tuple(LayerCost(**{k: layer[k] for k in LayerCost.__dataclass_fields__})
                   for layer in doc["layers"])
    return Profile(
        model=doc["model"], batch_size=doc["batch_size"], device=doc["device"],
        dtype=doc["dtype"], compute_method=doc["compute_method"], measured=doc["measured"],
        layers=layers, forward_backward_s=doc["step"]["forward_backward_s"],
        optimizer_s=doc["step"]["optimizer_s"],
        pack_s=doc["step"].get("pack_s", 0.0), apply_s=doc["step"].get("apply_s", 0.0),
        backward_allreduce_s=doc["step"].get("backward_allreduce_s", 0.0),
        gradient_buckets=tuple(GradientBucket(bytes=b["bytes"], ready_s=float(b["ready_s"]))
                               for b in doc["step"].get("gradient_buckets", ())),
        comm=_comm_costs(doc["comm"], source=source),
        contention=Contention(**doc["contention"]) if "contention" in doc else None,
        extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
    )


_COMM_KEYS = {"backend", "world_size", "allreduce", "broadcast", "message_bytes",
              "broadcast_overlap", "link_bytes_per_s", "link_burst_s", "link_idle_s",
              "gradient_allreduce_cpu_s", "gradient_buckets_s"}
_COLLECTIVE_KEYS = {"alpha_s", "beta_s_per_byte", "seconds", "root_seconds"}


def _measured_points(comm: dict, kind: str, key: str, *, source: str) -> MeasuredPoints | None:
    """comm[kind][key] (seconds, one per comm.message_bytes entry) as points; None without."""
    seconds = comm[kind].get(key)
    if seconds is None or "message_bytes" not in comm:
        return None
    sizes = comm["message_bytes"]
    if len(seconds) != len(sizes) or any(b >= a for a, b in zip(sizes[1:], sizes)):
        raise InputError(f"{source}: field comm.{kind}.{key}: expected one time per "
                         f"comm.message_bytes entry ({len(sizes)}, ascending sizes), "
                         f"got {len(seconds)}")
    return MeasuredPoints(tuple(sizes), tuple(float(t) for t in seconds))


def _comm_costs(comm: dict, *, source: str) -> CommCosts:
    """The comm section: the alpha-beta fits and, with message_bytes, the measured points."""
    points = {kind: _measured_points(comm, kind, "seconds", source=source)
              for kind in ("allreduce", "broadcast")}
    notes = {k: v for k, v in comm.items() if k not in _COMM_KEYS}
    notes.update({f"{kind}_fit": {k: v for k, v in comm[kind].items()
                                  if k not in _COLLECTIVE_KEYS}
                  for kind in ("allreduce", "broadcast")})
    return CommCosts(backend=comm["backend"], world_size=comm["world_size"],
                     allreduce=AlphaBeta(**_alpha_beta(comm["allreduce"])),
                     broadcast=AlphaBeta(**_alpha_beta(comm["broadcast"])),
                     allreduce_points=points["allreduce"], broadcast_points=points["broadcast"],
                     broadcast_root_points=_measured_points(comm, "broadcast", "root_seconds",
                                                            source=source),
                     broadcast_overlap=comm.get("broadcast_overlap", 1.0),
                     link_bytes_per_s=comm.get("link_bytes_per_s"),
                     link_burst_s=comm.get("link_burst_s", 0.0),
                     link_idle_s=comm.get("link_idle_s"),
                     gradient_allreduce_cpu_s=comm.get("gradient_allreduce_cpu_s"),
                     gradient_buckets_s=comm.get("gradient_buckets_s"), notes=notes)


def _alpha_beta(d: dict) -> dict:
    return {"alpha_s": d["alpha_s"], "beta_s_per_byte": d["beta_s_per_byte"]}


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file."""
    return profile_from_dict(read_json(path, what="profile"), source=f"profile {str(path)!r}")


def profile_to_dict(profile: Profile) -> dict:
    """The file form of a Profile (schema dpkfac.profile/1)."""
    doc = {
        "schema": PROFILE_SCHEMA_ID,
        "model": profile.model, "batch_size": profile.batch_size, "device": profile.device,
        "dtype": profile.dtype, "compute_method": profile.compute_method,
        "measured": profile.measured,
        "layers": [asdict(layer) for layer in profile.layers],
        "step": {"forward_backward_s": profile.forward_backward_s,
                 "optimizer_s": profile.optimizer_s, "pack_s": profile.pack_s,
                 "apply_s": profile.apply_s},
        "comm": _comm_to_dict(profile.comm),
    }
    if profile.backward_allreduce_s:
        doc["step"]["backward_allreduce_s"] = profile.backward_allreduce_s
    if profile.gradient_buckets:
        doc["step"]["gradient_buckets"] = [{"bytes": b.bytes, "ready_s": b.ready_s}
                                           for b in profile.gradient_buckets]
    if profile.contention is not None:
        doc["contention"] = {k: v for k, v in asdict(profile.contention).items()
                             if v is not None}
    doc.update(profile.extra)
    return doc


def _comm_to_dict(costs: CommCosts) -> dict:
    """The file form of the comm section (alpha-beta fits, measured points, notes)."""
    notes = dict(costs.notes)
    doc = {k: v for k, v in notes.items() if not k.endswith("_fit")}
    doc.update(backend=costs.backend, world_size=costs.world_size)
    if costs.broadcast_overlap != 1.0:
        doc["broadcast_overlap"] = costs.broadcast_overlap
    if costs.link_bytes_per_s is not None:
        doc["link_bytes_per_s"] = costs.link_bytes_per_s
    if costs.link_burst_s:
        doc["link_burst_s"] = costs.link_burst_s
    for key in ("link_idle_s", "gradient_allreduce_cpu_s", "gradient_buckets_s"):
        if getattr(costs, key) is not None:
            doc[key] = getattr(costs, key)
    for kind, fit, points in (("allreduce", costs.allreduce, costs.allreduce_points),
                              ("broadcast", costs.broadcast, costs.broadcast_points)):
        doc[kind] = dict(notes.get(f"{kind}_fit", {}), **asdict(fit))
        if points is not None:
            doc[kind]["seconds"] = list(points.seconds)
            doc["message_bytes"] = list(points.message_bytes)
    if costs.broadcast_root_points is not None:
        doc["broadcast"]["root_seconds"] = list(costs.broadcast_root_points.seconds)
    return doc
