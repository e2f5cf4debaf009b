"""Collective costs: all-reduce and broadcast timed over message sizes, as training meets them,
fitted to alpha-beta lines (seconds, seconds per byte), and how far concurrent broadcasts
overlap."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime.distributed import WorldInfo
from ..runtime.timing import synchronize_device
from .alphabeta import fit_alpha_beta
from .options import ProfileOptions
from .robust import trimmed_mean

# Collective costs assumed when profiling a single process (nothing to measure): loopback gloo.
ASSUMED_COMM = {"alpha_s": 5e-5, "beta_s_per_byte": 1e-9}
MIN_LARGEST_MESSAGE = 4 << 20   # bytes: always time at least up to 4 MiB
MAX_LARGEST_MESSAGE = 64 << 20  # bytes: and never beyond 64 MiB


def message_sizes(model_grad_bytes: int, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Collective message sizes to time, bytes: powers of 4 from 1 KiB up to the model's whole
    gradient (at least 4 MiB, at most 64 MiB), and the `extra` sizes within that range (the
    messages the step itself sends, so the curve is measured where it is read)."""
    largest = min(max(model_grad_bytes, MIN_LARGEST_MESSAGE), MAX_LARGEST_MESSAGE)
    sizes, size = {int(n) for n in extra if 1 << 10 < n < largest}, 1 << 10
    while size <= largest:
        sizes.add(size)
        size *= 4
    return tuple(sorted(sizes))


def profile_comm(world: WorldInfo, options: ProfileOptions, sizes: tuple[int, ...],
                  before=lambda: None, between=lambda trial: None, owner_bytes: int = 1 << 10,
                  gradient_bytes: int | None = None,
                  bucket_bytes: tuple[int, ...] = ()) -> CommProfile:
    """The profile's `comm` entry (CommProfile.entry): alpha-beta fits per collective kind over
    `sizes` (bytes), each call timed after `before()` (`between(trial)` after each of their
    trials), the broadcast overlap at `owner_bytes` per owner, the CPU seconds of the gradient
    all-reduce (`gradient_bytes`, when given), and with two or more gradient buckets
    (`bucket_bytes`, in posting order) their all-reduces posted back to back as the step posts
    them, by every rank at once (`gradient_buckets_s`, bucket_chain_s); with a shaped link
    (options.link_burst_s), how long the link idled before each timed call (`link_idle_s`);
    assumed costs on a world of one. With it, what `before()` took (CommProfile.before_s)."""
    backend = world.backend or ("nccl" if world.device.type == "cuda" else "gloo")
    if world.world_size == 1:
        return CommProfile({"backend": backend, "world_size": 1, "allreduce": dict(ASSUMED_COMM),
                            "broadcast": dict(ASSUMED_COMM),
                            "source": "assumed (single process: nothing to measure; run under "
                                      "torchrun to fit)"}, None)
    kinds = ("allreduce", "broadcast")
    shared = torch.zeros(max(max(sizes) // 4, 1), dtype=torch.float32, device=world.device)
    ops = [_collective(kind, shared[:max(n // 4, 1)]) for kind in kinds for n in sizes]
    timed = time_collectives(ops, world, options, before, between)
    means = timed.seconds
    fits = {}
    for k, kind in enumerate(kinds):
        seconds = means[k * len(sizes):(k + 1) * len(sizes)]
        fits[kind] = dict(fit_alpha_beta(sizes, seconds), seconds=seconds)
    fits["broadcast"]["root_seconds"] = timed.rank0_after_last_s[len(sizes):]
    link = {} if options.link_bytes_per_s is None else {
        "link_bytes_per_s": options.link_bytes_per_s,
        **({"link_burst_s": options.link_burst_s, "link_idle_s": timed.idle_s}
           if options.link_burst_s else {})}
    entry = {"backend": backend, "world_size": world.world_size, **fits, "source": "measured",
             "statistic": "mean over trials of (last rank's return - mean arrival)",
             "message_bytes": list(sizes), **link,
             **({"gradient_buckets_s": bucket_chain_s(world, options, bucket_bytes)}
                if len(bucket_bytes) > 1 else {}),
             **_broadcast_overlap(world, options, max(owner_bytes, 1 << 10), before),
             **({} if gradient_bytes is None else {"gradient_allreduce_cpu_s": _allreduce_cpu_s(
                 world, options, gradient_bytes, before)})}
    return CommProfile(entry, timed.compute_s)


@dataclass(frozen=True)
class CommProfile:
    """profile_comm's result: the profile's `comm` entry, and the seconds of one `before()`
    over the collectives' trials (trimmed mean per rank, mean over ranks; hundreds of samples
    spread over the whole profile; None on one rank, where nothing is timed)."""
    entry: dict
    before_s: float | None


def _allreduce_cpu_s(world: WorldInfo, options: ProfileOptions, nbytes: int, before) -> float:
    """CPU seconds one all-reduce of `nbytes` bytes costs a rank's process (its collective
    threads' copies and reductions, not the waits): process CPU time across the call, after
    `before()` as in training; median over repeats, mean over ranks. The part of the
    all-reduce that competes with compute when it runs beside it (the overlapped step)."""
    buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=world.device)
    samples = []
    for trial in range(options.warmup + options.repeats):
        dist.barrier()
        before()
        synchronize_device()
        start = time.process_time()
        dist.all_reduce(buf)
        synchronize_device()
        if trial >= options.warmup:
            samples.append(time.process_time() - start)
    median = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(median)
    return float(median) / world.world_size


def _collective(kind: str, buf: torch.Tensor):
    """One blocking all-reduce or broadcast (from rank 0) of `buf` (a leading slice of one
    buffer shared by every message size, so memory stays at the largest size), as a callable."""
    return (lambda: dist.all_reduce(buf)) if kind == "allreduce" else (lambda: dist.broadcast(buf, 0))


def bucket_chain_s(world: WorldInfo, options: ProfileOptions,
                   bucket_bytes: tuple[int, ...]) -> float:
    """Seconds of the gradient buckets' all-reduces (`bucket_bytes`, in posting order) posted
    back to back by every rank at once, from the posting to the last one's completion on the
    slowest rank; mean over the trials. The step model starts the chain when the last rank
    has posted its first bucket, so the ranks' arrival spread is not part of this figure.
    Each trial first leaves a shaped link idle for twice its token bucket (options.
    link_burst_s), long enough to refill it."""
    bufs = [torch.zeros(max(n // 4, 1), dtype=torch.float32, device=world.device)
            for n in bucket_bytes]
    samples = []
    for trial in range(options.warmup + 2 * options.repeats):
        time.sleep(2 * options.link_burst_s)
        dist.barrier()
        start = time.perf_counter()
        for work in [dist.all_reduce(buf, async_op=True) for buf in bufs]:
            work.wait()
        synchronize_device()
        if trial >= options.warmup:
            samples.append(time.perf_counter() - start)
    took = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took.mean())


def _broadcast_overlap(world: WorldInfo, options: ProfileOptions, nbytes: int, before) -> dict:
    """How many broadcasts posted together progress at once, as the executor posts them: one
    asynchronous broadcast of `nbytes` bytes from every rank, then wait for all; overlap =
    world_size x (one broadcast's time) / (the group's time), between 1 and world_size."""
    bufs = [torch.zeros(max(nbytes // 4, 1), device=world.device)
            for _ in range(world.world_size)]

    def group():
        for work in [dist.broadcast(buf, src, async_op=True) for src, buf in enumerate(bufs)]:
            work.wait()

    single_s, group_s = time_collectives([lambda: dist.broadcast(bufs[0], 0), group], world,
                                          options, before).seconds
    overlap = min(max(world.world_size * single_s / group_s, 1.0), float(world.world_size))
    return {"broadcast_overlap": overlap,
            "broadcast_overlap_measured": {"message_bytes": nbytes, "one_s": single_s,
                                           "all_ranks_s": group_s}}


@dataclass(frozen=True)
class CollectiveTimes:
    """time_collectives' result: seconds of each op; seconds the link idled before each call
    (the ranks' mean compute before it, over every op and timed trial); that compute's
    trimmed mean (robust.trimmed_mean per rank, mean over ranks); and, per op, rank 0's
    seconds from the last rank's arrival to its own return (at least 0, median over the timed
    trials): what a broadcast from rank 0 costs its root once every rank has posted it."""
    seconds: list[float]
    idle_s: float
    rank0_after_last_s: list[float]
    compute_s: float  # each rank's trimmed mean of its compute before a call, mean over ranks


def time_collectives(ops, world: WorldInfo, options: ProfileOptions, before,
                     between=lambda trial: None) -> CollectiveTimes:
    """Seconds of each collective call in `ops` as training meets it: right after compute
    (`before`, one forward/backward of the model, when the communication threads have gone
    idle), not back to back. Each trial: barrier, compute, then one timed call on every rank.
    A trial's time is from the ranks' mean arrival to the last rank's return,
    max_r(compute_r + call_r) - mean_r(compute_r) (each measured from the barrier): the
    step model starts a collective when the ranks have computed for their typical (mean) time,
    so the call's time carries the wait for the ranks that arrive later, and ends when the
    last rank is done (a broadcast's root returns early). Trials are interleaved (trial i of
    every op, then trial i + 1), so a drift of a shared host's load over the minutes of
    profiling shifts every message size alike instead of bending the size-to-time curve. The
    mean over the trials, not the median: collectives on shared hosts have long tails, and
    the planner predicts mean step times. Every rank runs the same fixed number of
    collectives. `between(trial)` runs after each trial (0, 1, ...), untimed, on every rank.
    Rank 0's own seconds from the last rank's arrival to its return are kept too (a
    broadcast's root: what the model charges the last owner, who posts last), as a median:
    the root's own work is short, and the trials' wake-ups of an idle host are its tail."""
    trials = options.warmup + 2 * options.repeats
    arrive = torch.zeros(len(ops), trials, dtype=torch.float64)
    done = torch.zeros(len(ops), trials, dtype=torch.float64)
    for trial in range(trials):
        for j, op in enumerate(ops):
            dist.barrier()
            start = time.perf_counter()
            before()
            synchronize_device()
            arrive[j, trial] = time.perf_counter() - start
            op()
            synchronize_device()
            done[j, trial] = time.perf_counter() - start
        between(trial)
    compute = torch.tensor([trimmed_mean(arrive[:, options.warmup:].flatten().tolist())],
                           dtype=torch.float64)
    dist.all_reduce(compute)
    last = arrive.clone()
    dist.all_reduce(last, op=dist.ReduceOp.MAX)
    rank0_done = done.clone()
    dist.broadcast(rank0_done, 0)
    dist.all_reduce(arrive)  # sum over ranks
    dist.all_reduce(done, op=dist.ReduceOp.MAX)
    seconds = done - arrive / world.world_size
    rank0_after = (rank0_done - last).clamp(min=0.0)[:, options.warmup:]
    return CollectiveTimes(seconds=seconds[:, options.warmup:].mean(dim=1).tolist(),
                           idle_s=float(arrive[:, options.warmup:].mean()) / world.world_size,
                           rank0_after_last_s=rank0_after.median(dim=1).values.tolist(),
                           compute_s=float(compute) / world.world_size)
