"""DP-KFAC inside your own torchrun training script: your model, data, loss and loop.

    torchrun --nproc_per_node 2 examples/train_own_model.py --out runs/own
    torchrun --nproc_per_node 2 examples/train_own_model.py --out runs/own --resume

What it shows, in the order a script does it:
1. dpkfac.profile(model, batch): every rank measures, in process, on one of its own batches;
2. dpkfac.plan_for_group(profile): rank 0 plans, every rank gets the same placement;
3. DDP + dpkfac.DPKFAC(ddp_model, placement): gradients are averaged by DDP, then the owner of
   each layer preconditions it and broadcasts the result;
4. the loop: bf16 autocast, K micro-batches per optimizer step (DDP's no_sync for all but the
   last; each loss divided by K, so the K-FAC factors are those of the whole K*B batch), an LR
   schedule, and per-epoch checkpoints through state_dict (each rank its own file: the
   preconditioner's state is its owned layers') that --resume continues exactly, under the
   placement the run started with (saved beside them).
Replace Net, make_data and the loss with your own.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dpkfac

CLASSES = 4


class Net(nn.Module):
    """A small CNN for 3x16x16 images, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.norm = nn.LayerNorm(64)  # K-FAC leaves it alone: plain averaged gradients
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))


def make_data(samples: int, seed: int) -> TensorDataset:
    """Noisy images whose class k lights channel k % 3 in quadrant k: learnable, seeded."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (samples,), generator=gen)
    x = torch.randn(samples, 3, 16, 16, generator=gen)
    for k in range(CLASSES):
        rows, cols = (k // 2) * 8, (k % 2) * 8
        x[labels == k, k % 3, rows:rows + 8, cols:cols + 8] += 0.3
    return TensorDataset(x, labels)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs (to try --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--placement", type=Path, default=None,
                   help="train under this placement file instead of profiling and planning")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) \
        if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model = Net().to(device)
    train, test = make_data(2048, seed=0), make_data(512, seed=1)
    sampler = DistributedSampler(train, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.micro_batch, sampler=sampler, drop_last=True)

    # 1-2. Profile in process on this rank's first batch, plan on rank 0, share the placement.
    # A resumed run keeps the placement it started with (the checkpoints hold owners' state).
    placement_file = args.out / "placement.json"
    if args.resume or args.placement:
        placement = json.loads((args.placement or placement_file).read_text())
    else:
        x, y = next(iter(loader))
        profile = dpkfac.profile(model, (x.to(device), y.to(device)), name="examples:Net",
                                 warmup=1, repeats=5)
        placement = dpkfac.plan_for_group(profile)
    if rank == 0 and not args.resume:
        args.out.mkdir(parents=True, exist_ok=True)
        placement_file.write_text(json.dumps(placement, indent=1))

    # 3. DDP averages the gradients; DP-KFAC preconditions them under the placement.
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(loader) // args.accumulate
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    precond = dpkfac.DPKFAC(ddp, placement, lr=lambda: optimizer.param_groups[0]["lr"])

    checkpoint = args.out / f"checkpoint.rank{rank}.pt"
    start = 0
    if args.resume:
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precond.load_state_dict(state["preconditioner"])
        start = state["epoch"]
    args.out.mkdir(parents=True, exist_ok=True)

    # 4. The loop: autocast, accumulation, schedule, checkpoints.
    losses = []
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, stop):
        sampler.set_epoch(epoch)
        batches, total = iter(loader), 0.0
        for _ in range(steps_per_epoch):
            for k in range(args.accumulate):
                x, y = (t.to(device) for t in next(batches))
                sync = nullcontext() if k == args.accumulate - 1 else ddp.no_sync()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(ddp(x), y) / args.accumulate
                loss.backward()
                total += float(loss.detach())
            precond.step()  # after backward (DDP has averaged), before the optimizer
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        losses.append(total / steps_per_epoch)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "preconditioner": precond.state_dict(), "epoch": epoch + 1}, checkpoint)
    report(args.out, model, test, device, losses, rank, world, precond.memory_usage())
    dist.destroy_process_group()


def report(out: Path, model: nn.Module, test: TensorDataset, device: torch.device,
           losses: list[float], rank: int, world: int, memory: int) -> None:
    """Rank 0 writes result.json: epoch losses, test accuracy, every rank's parameter digest
    and second-order memory."""
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"digest": digest, "memory_bytes": memory})
    x, y = test.tensors
    with torch.no_grad():
        accuracy = float((model.eval()(x.to(device)).argmax(1).cpu() == y).float().mean())
    if rank == 0:
        (out / "result.json").write_text(json.dumps(
            {"epoch_losses": losses, "test_accuracy": accuracy, "ranks": gathered}, indent=1))


if __name__ == "__main__":
    main()
