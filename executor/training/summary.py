"""The run summary (summary.json): losses, accuracy, phase means, bytes per step by collective
kind, second-order memory and parameter digests of every rank, numerical-safety totals."""
from __future__ import annotations

import hashlib
import statistics

import torch
from torch import nn

from dpkfac.core.step import NUMERICS_COUNTERS, SECOND_ORDER_TRAFFIC, ring_allreduce_bytes

from ..runtime.distributed import all_gather_object
from ..workload.loaders import test_loader
from ..workload.loss import IGNORE_INDEX, LossFn, cross_entropy
from .config import run_variant


def job_numerics(precond, skipped: int) -> dict[str, int]:
    """Cumulative safety-net counters of the whole job (identical on every rank), with the
    steps skipped for a non-finite loss or gradient."""
    counters = precond.numerics if precond is not None else dict.fromkeys(NUMERICS_COUNTERS, 0)
    return {**counters, "skipped_steps": skipped}


def summarise(cfg, world, model, precond, records, steps, grad_bytes, split, skipped,
              loss_fn: LossFn = cross_entropy) -> dict:
    """The summary of a run of `steps` steps with per-step `records` (collective over every
    rank); `grad_bytes`: bytes of the fused gradient all-reduce buffer."""
    steady = records[cfg.warmup_steps:] or records
    memory = precond.memory_usage() if precond is not None else 0
    kinds = precond.comm_bytes_per_step() if precond is not None else {}
    layer_events = {n: dict(c) for n, c in precond.layer_numerics.items()} if precond else {}
    phases = {k: statistics.fmean(r[k] for r in steady) for k in steady[0]
              if k.endswith("_s")} if steady else {}
    per_rank = all_gather_object({"memory": memory, "digest": parameter_digest(model),
                                  "comm": kinds, "numerics": layer_events,
                                  "phases": phases}, world)
    allreduce = ring_allreduce_bytes(grad_bytes, world.world_size)
    mine = per_rank[world.rank]
    totals = dict(job_numerics(None, skipped))
    for rank_events in per_rank:  # every owner's own counts: exact for every strategy
        for counts in rank_events["numerics"].values():
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + int(value)
    losses = [r["loss"] for r in records if r["loss"] is not None]
    test_loss, test_accuracy = evaluate(model, split.test, world.device, loss_fn)
    return {
        "world_size": world.world_size, "algorithm": cfg.algorithm,
        "variant": run_variant(cfg, world.world_size), "steps": steps,
        "final_loss": losses[-1] if losses else None,
        "numerics": totals,
        "numerics_per_layer": {n: c for r in per_rank for n, c in r["numerics"].items() if c},
        "test_loss": test_loss, "test_accuracy": test_accuracy,
        "mean_step_time_s": statistics.fmean(r["step_time_s"] for r in steady) if steady else None,
        "steady_state": f"mean over steps after the first {cfg.warmup_steps} of this run",
        "phase_means_s": phases,
        "phase_means_by_rank_s": [r["phases"] for r in per_rank],
        "dataset": split.name, "data": split.entry,
        "staggered_decompositions": bool(precond is not None and precond.stagger_decompositions),
        "overlap": cfg.overlap,
        "comm_bytes_per_step": comm_breakdown(allreduce, mine["comm"]),
        "second_order_memory_bytes": [r["memory"] for r in per_rank],
        "parameter_sha256": [r["digest"] for r in per_rank],
        "parameters_identical": len({r["digest"] for r in per_rank}) == 1,
    }


def comm_breakdown(allreduce: int, kinds: dict[str, float]) -> dict[str, float]:
    """Bytes this rank sent + received per step by collective kind: 'gradient_allreduce' (also
    under 'allreduce'), the second-order kinds (SECOND_ORDER_TRAFFIC), 'broadcast' (every
    broadcast byte, counters included) and 'total'. Whole numbers stay ints."""
    tidy = lambda v: int(v) if float(v).is_integer() else v  # noqa: E731
    out = {"allreduce": allreduce, "gradient_allreduce": allreduce}
    out.update({kind: tidy(kinds.get(kind, 0)) for kind in (*SECOND_ORDER_TRAFFIC, "broadcast")})
    out["total"] = tidy(allreduce + kinds.get("factor_allreduce", 0) + kinds.get("broadcast", 0))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device, loss_fn: LossFn = cross_entropy
             ) -> tuple[float, float | None]:
    """(mean loss per sample, accuracy) over the whole test set with the model's current
    weights: each batch's loss weighted by its samples; accuracy = argmax over the output's last
    dimension against integer class-label targets (positions labelled -100 left out), None when
    the targets are not class labels."""
    model.eval()
    loss_sum, samples, correct, labelled = 0.0, 0, 0, 0
    for x, y in test_loader(dataset):
        x, y = x.to(device), y.to(device)
        output = model(x)
        loss_sum += float(loss_fn(output, y)) * len(x)
        samples += len(x)
        if labelled is not None and _class_labels(output, y):
            counted = y != IGNORE_INDEX
            correct += int(((output.argmax(dim=-1) == y) & counted).sum())
            labelled += int(counted.sum())
        else:
            labelled = None
    model.train()
    return loss_sum / samples, (correct / labelled if labelled else None)


def _class_labels(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Integer targets shaped like the output without its last (class) dimension."""
    return not target.is_floating_point() and tuple(target.shape) == tuple(output.shape[:-1])


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of all parameters' bytes, to compare ranks bit for bit."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
