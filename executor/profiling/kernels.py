"""Per-layer K-FAC kernel times: a one-rank preconditioner owning every layer runs training-like
steps, and each of its per-layer phase methods (the ones `step()` runs) is timed on its own."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..kfac import ComputeMethod, KFACBlock, kfac_layers, make_block
from ..preconditioner import BaseKFACPreconditioner, Exchange, WorkAssignment
from ..runtime.buckets import GradientBuckets, model_bucket_bytes
from ..runtime.timing import synchronize_device
from ..workload.loaders import Batches
from ..workload.loss import LossFn
from .options import ProfileOptions
from .robust import trimmed_mean

LAYER_KERNELS = ("factor_a", "factor_g", "decompose_a", "decompose_g", "precondition")
STEP_PHASES = ("forward_backward", "pack", "apply", "optimizer")
OVERLAPPED_FB = "forward_backward_overlapped"  # with the buckets' all-reduces posted from it


def one_rank_preconditioner(model: nn.Module, options: ProfileOptions) -> BaseKFACPreconditioner:
    """A preconditioner on a world of one that owns and captures every K-FAC layer of `model`,
    with the KL clip (lr 0.1, bound 0.001) and the damping and decay `options` give."""
    blocks = {name: make_block(module, name) for name, module in kfac_layers(model)}
    return BaseKFACPreconditioner(
        blocks, WorkAssignment.single_rank(list(blocks)), Exchange(rank=0, world_size=1),
        lr=0.1, damping=options.damping, factor_decay=options.factor_decay, kl_clip=0.001,
        factor_update_freq=1, inv_update_freq=1,
        compute_method=ComputeMethod(options.compute_method))


def accumulate_factors(model: nn.Module, precond: BaseKFACPreconditioner, batches: Batches,
                       loss_fn: LossFn) -> dict[str, int]:
    """Fold every batch's factors into the running averages, as training does (so the
    decompositions are timed on realistic, full-rank factors); returns each layer's factor rows
    (block.factor_rows) of the last batch."""
    for x, y in batches:
        model.zero_grad()
        precond.capture.clear()  # capture keeps every micro-batch until cleared
        loss_fn(model(x), y).backward()
        for name in precond.blocks:
            precond.fold_factors(name, precond.batch_factor(name, "a"),
                                 precond.batch_factor(name, "g"))
    return {name: block.factor_rows(precond.capture.batch(name)[1])
            for name, block in precond.blocks.items()}


def time_steps(model: nn.Module, precond: BaseKFACPreconditioner, batches: Batches,
               loss_fn: LossFn, options: ProfileOptions, advance: Callable[[], None],
               align: Callable[[], None] = lambda: None, world_size: int = 1,
               alone: bool | None = None) -> StepSamples:
    """Run every one of a StepTimer's steps (see it), calling `advance()` after each; its
    samples."""
    timer = StepTimer(model, precond, batches, loss_fn, options, align=align,
                      world_size=world_size, alone=alone)
    try:
        while timer.left:
            timer.step()
            advance()
    finally:
        timer.close()
    return timer.samples


class StepTimer:
    """Training-like steps run and timed one at a time, so a caller can spread them over a
    longer span (between the collectives' trials: a shared host's slow seconds then touch a
    few steps, which the trimmed means drop, instead of every one). `step()` runs the next of
    the options' warm-up steps and `repeats` timed steps of each kind (one kind on one rank,
    two with more: see below), `left` counts those still to run, `close()` removes the
    gradient buckets' hooks; `samples` (StepSamples) holds what follows.

    Seconds of every kernel in each timed step: {layer name or "step": {kernel: [s, ...]}}
    of the steps every rank computes ("busy"), and, with `alone` set, of the steps between
    them where rank 0 computes alone ("alone"; None elsewhere). `align()` runs before each
    step (a barrier, when every rank times steps at once).

    `alone` (more than one rank timing together): after each busy step, rank 0 (alone=True)
    runs and times the same step again while the others (alone=False) only take part in its
    traffic (_traffic_step), so the two kinds see the host at the same moments and their
    ratio (contention_slowdown) is not a drift of the host's speed between two spans.

    With `world_size` > 1 ranks timing together, the step's traffic runs too, where the
    executor's overlapped DP-KFAC step has it: the gradient buckets' all-reduces
    (runtime.buckets) are in flight during the factors and decompositions (waited for, untimed,
    before preconditioning), and rank 0 broadcasts every preconditioned gradient before the
    write-back; so the kernels meet what the traffic costs the host (its network stack,
    caches). Steps alternate between the two ways `train` posts the buckets: from backward as
    they fill (the overlapped step: forward/backward, timed as OVERLAPPED_FB, holds what posting
    them and their collective threads take from it; the buckets' ready times recorded) and
    after it (--no-overlap: forward/backward and the packing of every bucket timed). On one
    rank, where nothing travels, every step is of the first kind, timed as forward_backward,
    its packing with the averaging and copy back.

    Each step: forward/backward (with the capture hooks), the packing of the gradient
    all-reduce, every layer's factors, then every decomposition, then every preconditioning,
    the KL clip and write-back, and an optimizer step with learning rate 0 (weights stay put),
    in the executor's order, so each kernel meets the caches as training leaves them. The
    per-layer kernels are the preconditioner's per-layer methods: factor_a is batch_factor A;
    factor_g is batch_factor G and fold_factors (both running averages and their non-finite
    check); decompose_a / decompose_g are decompose_factor; precondition is precondition_layer.
    """

    def __init__(self, model: nn.Module, precond: BaseKFACPreconditioner, batches: Batches,
                 loss_fn: LossFn, options: ProfileOptions, *,
                 align: Callable[[], None] = lambda: None, world_size: int = 1,
                 alone: bool | None = None) -> None:
        self._model, self._precond, self._batches, self._loss_fn = model, precond, batches, loss_fn
        self._warmup, self._align, self._world_size, self._alone = \
            options.warmup, align, world_size, alone
        self._optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9,
                                          weight_decay=5e-4)
        self._buckets = GradientBuckets(model, world_size, record_times=True)
        names, count = list(precond.blocks), len(self._buckets.members)
        self.samples = StepSamples(
            busy=_empty_samples(names, count, world_size),
            alone=_empty_samples(names, count, world_size) if alone else None)
        self._traffic = _traffic_numels(model, precond)
        self._done, self._total = 0, options.warmup + timed_steps(options, world_size)

    @property
    def left(self) -> int:
        """Steps still to run."""
        return self._total - self._done

    def step(self) -> None:
        """Run (and, past the warm-up, time) the next step; with `alone` set, rank 0 then runs
        it again alone while the others take part in its traffic only."""
        i = self._done
        how = dict(keep=i >= self._warmup, align=self._align, world_size=self._world_size,
                   overlapped=(i - self._warmup) % 2 == 0)
        run = (self._model, self._precond, self._batches[i % len(self._batches)],
               self._loss_fn, self._optimizer, self._buckets)
        _time_one_step(*run, self.samples.busy, **how)
        if self._alone:
            _time_one_step(*run, self.samples.alone, **how)
        elif self._alone is False:
            _traffic_step(*self._traffic, self._align, self._world_size)
        self._done += 1

    def close(self) -> None:
        """Detach the gradient buckets' hooks from the model."""
        self._buckets.remove()


def timed_steps(options: ProfileOptions, world_size: int) -> int:
    """Timed steps of a StepTimer: `repeats` of each kind (two kinds with more than one rank:
    buckets posted from backward and after it)."""
    return (2 if world_size > 1 else 1) * options.repeats


@dataclass(frozen=True)
class StepSamples:
    """time_steps' samples: of the steps every rank computes, and of rank 0's alone (or None)."""
    busy: dict[str, dict[str, list[float]]]
    alone: dict[str, dict[str, list[float]]] | None


def _empty_samples(names: list[str], buckets: int, world_size: int) -> dict:
    """time_steps' sample lists for layers `names`, the step phases and `buckets` buckets."""
    samples = {name: {k: [] for k in LAYER_KERNELS} for name in names}
    samples["step"] = {k: [] for k in STEP_PHASES}
    samples["step"].update({bucket_key(b): [] for b in range(buckets)})
    if world_size > 1:
        samples["step"][OVERLAPPED_FB] = []
    return samples


def bucket_key(b: int) -> str:
    """The step sample holding gradient bucket `b`'s ready times (seconds from the forward's
    start until its last gradient is accumulated)."""
    return f"bucket_ready_{b}"


def _time_one_step(model: nn.Module, precond: BaseKFACPreconditioner,
                   batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn, optimizer,
                   buckets: GradientBuckets, samples: dict, *, keep: bool,
                   align: Callable[[], None], world_size: int, overlapped: bool) -> None:
    names = list(precond.blocks)
    step = samples["step"]
    x, y = batch
    precond.capture.clear()
    align()
    serial, overlapping = world_size > 1 and not overlapped, world_size > 1 and overlapped
    with _timed(step[OVERLAPPED_FB if overlapping else "forward_backward"], keep):
        optimizer.zero_grad(set_to_none=False)
        start = time.perf_counter()
        loss = loss_fn(model(x), y)
        loss_buf = loss.detach().reshape(1).clone()
        if not serial:
            buckets.arm(loss_buf)
        loss.backward()
    if serial:
        buckets.arm(loss_buf)
    with _timed(step["pack"], keep and not overlapping):
        buckets.post_remaining()
        if world_size == 1:
            buckets.wait()
    if keep and not serial:
        for b, ready_at in enumerate(buckets.ready_at):
            step[bucket_key(b)].append(ready_at - start)
    for name in names:
        with _timed(samples[name]["factor_a"], keep):
            a = precond.batch_factor(name, "a")
        with _timed(samples[name]["factor_g"], keep):
            precond.fold_factors(name, a, precond.batch_factor(name, "g"))
    for name in names:
        for side in ("a", "g"):
            with _timed(samples[name][f"decompose_{side}"], keep):
                precond.decompose_factor(name, side)
    buckets.wait()  # in flight since posted (untimed)
    results = {}
    for name in names:
        with _timed(samples[name]["precondition"], keep):
            results[name] = precond.precondition_layer(name)
    _broadcast_from_rank0(list(results.values()), world_size)
    with _timed(step["apply"], keep):
        precond.apply(results)
    with _timed(step["optimizer"], keep):
        optimizer.step()


def kfac_numel(precond: BaseKFACPreconditioner) -> int:
    """Elements of every K-FAC layer's gradient (what the owners' broadcasts carry in all)."""
    return sum(block.grad_numel for block in precond.blocks.values())


def _traffic_numels(model: nn.Module, precond: BaseKFACPreconditioner) -> tuple[list[int], int]:
    """Elements of each gradient bucket's all-reduce (the loss riding in bucket 0) and of rank
    0's broadcast of every preconditioned gradient."""
    itemsize = next(p for p in model.parameters() if p.requires_grad).element_size()
    numels = [nbytes // itemsize + (b == 0) for b, nbytes in enumerate(model_bucket_bytes(model))]
    return numels, kfac_numel(precond)


def _traffic_step(bucket_numels: list[int], kfac_numel: int, align: Callable[[], None],
                 world_size: int) -> None:
    """What one of time_steps' steps asks of a rank that computes nothing: each gradient
    bucket's all-reduce (`bucket_numels` elements) and rank 0's broadcast of `kfac_numel`."""
    align()
    pending = [torch.distributed.all_reduce(torch.zeros(n), async_op=True) for n in bucket_numels]
    for work in pending:
        work.wait()
    _broadcast_from_rank0([torch.zeros(kfac_numel)], world_size)


def contention_slowdown(busy: dict[str, dict[str, list[float]]],
                        alone: dict[str, dict[str, list[float]]]) -> float:
    """The K-FAC kernels' time with every rank computing over their time on one rank alone:
    the sum over layers and LAYER_KERNELS of trimmed-mean seconds, one over the other."""
    def total(samples):
        return sum(trimmed_mean(samples[name][k]) for name in samples if name != "step"
                   for k in LAYER_KERNELS)
    return total(busy) / total(alone)


def _broadcast_from_rank0(tensors: list[torch.Tensor], world_size: int) -> None:
    """One fused broadcast of `tensors` from rank 0 (what every owner's broadcast sends, all
    together); the receivers' copies are dropped."""
    if world_size > 1 and tensors:
        torch.distributed.broadcast(torch.cat([t.reshape(-1) for t in tensors]), src=0)


@contextmanager
def _timed(into: list[float], keep: bool):
    """Time the enclosed block (device-synchronised) into `into`, in seconds, when `keep`."""
    synchronize_device()
    start = time.perf_counter()
    yield
    synchronize_device()
    if keep:
        into.append(time.perf_counter() - start)


def _centre_and_spread(values: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return trimmed_mean(values), quartiles[2] - quartiles[0]


def layer_record(block: KFACBlock, samples: dict[str, list[float]], rows: int) -> dict:
    """A profile's layer entry: shapes, seconds per kernel (trimmed mean), state bytes, factor
    rows."""
    stats = {k: _centre_and_spread(v) for k, v in samples.items()}
    record = {"name": block.name, "kind": type(block.module).__name__,
              "dim_a": block.dim_a, "dim_g": block.dim_g, "grad_numel": block.grad_numel}
    record.update({f"{k}_s": stats[k][0] for k in LAYER_KERNELS})
    record.update(state_bytes=block.memory_usage(), rows_a=rows, rows_g=rows,
                  spread_iqr_s={k: stats[k][1] for k in LAYER_KERNELS})
    return record


def step_record(samples: dict[str, list[float]], bucket_bytes: list[int],
                forward_backward_s: float | None = None) -> dict:
    """A profile's step entry: seconds of each step phase (STEP_PHASES, trimmed means), the
    gradient buckets (bytes, ready time: seconds from the forward's start) and, when timed
    (more than one rank), backward_allreduce_s: what posting the buckets from backward adds to
    forward/backward (OVERLAPPED_FB's figure less forward_backward's, at least 0).

    `forward_backward_s` (seconds; the collectives' trials time hundreds of forward/backwards,
    the steps a few): the figure forward/backward takes, the steps' ready times and
    backward_allreduce_s scaled with it, so the steps give their shape and it the level."""
    stats = {k: _centre_and_spread(v) for k, v in samples.items()}
    steps_fb = stats["forward_backward"][0]
    level = forward_backward_s / steps_fb if forward_backward_s and steps_fb > 0 else 1.0
    buckets = [{"bytes": int(nbytes), "ready_s": level * stats[bucket_key(b)][0]}
               for b, nbytes in enumerate(bucket_bytes)]
    record = {**{f"{k}_s": stats[k][0] for k in STEP_PHASES},
              "spread_iqr_s": {k: stats[k][1] for k in STEP_PHASES},
              "gradient_buckets": buckets}
    record["forward_backward_s"] = level * steps_fb
    if OVERLAPPED_FB in stats:
        record["backward_allreduce_s"] = level * max(0.0, stats[OVERLAPPED_FB][0] - steps_fb)
    return record
