"""bench/speed.py's worker: several distributed K-FAC strategies timed in one torchrun job,
their blocks of steps interleaved, so every method meets the same host load.

Each method gets its own copy of the model (the same initial weights), optimizer, preconditioner
(the placement's owners, `train`'s default hyper-parameters) and StepRun, the step `dpkfac
train` runs; all train on the same cached batches. The job runs --rounds rounds; in each, every
method runs --block consecutive steps (a multiple of the decomposition interval, so every block
holds the same decompositions), the methods' order reversed in every other round. Rank 0 writes
{"methods": [...], "block_steps": k, "rounds": [{method: mean step seconds}, ...], "phases":
[{method: {phase: mean seconds}} per rank]}: rank 0's step times (as `train`'s summary), after
one untimed warm-up round.

    torchrun --nproc_per_node W bench/interleaved_steps.py --placement P.json \
        --methods dp-kfac,kaisa-comm-opt --block 20 --rounds 10 --out steps.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from dpkfac.core.jsonio import write_json_atomic
from dpkfac.core.placement import load_placement
from dpkfac.core.strategy import STRATEGY_OF
from executor.preconditioner import KFACPreconditioner
from executor.runtime.cpu_runtime import flushed_denormals, keep_freed_memory
from executor.runtime.distributed import (
    WorldInfo,
    all_gather_object,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)
from executor.runtime.faults import RunPosition
from executor.training.config import TrainConfig, batch_size, run_data_entry
from executor.training.loop import StepClock, StepRun
from executor.workload import prepare_workload
from executor.workload.loaders import train_loader

CACHED_BATCHES = 64  # distinct batches each rank cycles through


def method_step(variant: str, cfg: TrainConfig, placement: dict, model: torch.nn.Module,
                world: WorldInfo, loss_fn) -> StepRun:
    """`variant`'s training step on its own copy of `model`, as `dpkfac train` builds it from
    `cfg`."""
    mine = copy.deepcopy(model).to(world.device)
    broadcast_parameters(mine, world)
    optimizer = torch.optim.SGD(mine.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    strategy = STRATEGY_OF[variant]
    precond = None if strategy is None else KFACPreconditioner(
        mine, placement, strategy=strategy, lr=cfg.lr, damping=cfg.damping,
        factor_decay=cfg.factor_decay, kl_clip=cfg.kl_clip, overlap=cfg.overlap)
    return StepRun(mine, optimizer, precond, world, StepClock(False), RunPosition(), loss_fn,
                   overlap=cfg.overlap)


def cached_batches(dataset, batch_size: int, world: WorldInfo) -> list:
    """This rank's first CACHED_BATCHES batches of epoch 0, on its device."""
    loader, _ = train_loader(dataset, batch_size=batch_size, rank=world.rank,
                             world_size=world.world_size, seed=0)
    batches = []
    for x, y in loader:
        batches.append((x.to(world.device), y.to(world.device)))
        if len(batches) == CACHED_BATCHES:
            break
    return batches


def run_block(step: StepRun, batches: list, start: int, steps: int) -> list[dict]:
    """The step records (StepRun's) of `steps` steps of `step` from batch `start` on."""
    return [step([batches[(start + i) % len(batches)]])[0] for i in range(steps)]


def interleave(steps: dict[str, StepRun], batches: list, block: int, rounds: int,
               world: WorldInfo) -> tuple[list[dict[str, float]], dict[str, dict[str, float]]]:
    """Each round's mean step seconds per method, after one untimed warm-up round, and each
    method's mean seconds per phase over the timed rounds (this rank's)."""
    names = list(steps)
    timed, records = [], {name: [] for name in names}
    for round_ in range(rounds + 1):
        order = names if round_ % 2 == 0 else names[::-1]
        means = {}
        for name in order:
            if world.world_size > 1:
                torch.distributed.barrier()
            block_records = run_block(steps[name], batches, round_ * block, block)
            means[name] = statistics.fmean(r["step_time_s"] for r in block_records)
            if round_ > 0:
                records[name] += block_records
        if round_ > 0:
            timed.append({name: means[name] for name in names})
    phases = {name: {key: statistics.fmean(r[key] for r in rs) for key in rs[0]
                     if key.endswith("_s")} for name, rs in records.items()}
    return timed, phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placement", required=True)
    parser.add_argument("--methods", required=True, help="variants, comma-separated")
    parser.add_argument("--block", type=int, default=20, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = TrainConfig(placement=args.placement, out_dir="")  # `train`'s defaults
    placement = load_placement(args.placement)
    model_name = placement["model"]
    torch.manual_seed(cfg.seed)
    work = prepare_workload(model_name, run_data_entry(cfg, placement, model_name),
                            placement.get("loss"))
    world = init_distributed()
    keep_freed_memory()
    try:
        with flushed_denormals(True):
            batches = cached_batches(work.split.train, batch_size(cfg, placement), world)
            steps = {name: method_step(name, cfg, placement, work.model, world, work.loss_fn)
                     for name in args.methods.split(",")}
            rounds, phases = interleave(steps, batches, args.block, args.rounds, world)
        every_rank = all_gather_object(phases, world)
        if world.rank == 0:
            write_json_atomic(Path(args.out), {"methods": list(steps), "block_steps": args.block,
                                               "rounds": rounds, "phases": every_rank})
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
