"""Checkpoints: everything needed to continue a run exactly, written atomically by rank 0."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from planner.errors import InputError
from planner.jsonio import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dpkfac.checkpoint/1"


def rng_state() -> dict:
    """This process's random number generator states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_to_rank0(obj: object, *, rank: int, world_size: int) -> list | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def save_checkpoint(out_dir: Path, *, rank: int, world_size: int, common: dict,
                    per_rank: dict) -> None:
    """Gather per-rank state to rank 0, which writes DIR/checkpoint.pt atomically.

    `common` is identical on every rank (model, optimizer, step, epoch); `per_rank` holds what
    differs (preconditioner state of owned layers, RNG states).
    """
    gathered = gather_to_rank0(per_rank, rank=rank, world_size=world_size)
    if rank != 0:
        return
    payload = dict(common, format=CHECKPOINT_FORMAT, world_size=world_size, ranks=gathered)
    write_atomic(out_dir / CHECKPOINT_NAME, lambda fh: torch.save(payload, fh), binary=True)


def load_checkpoint(out_dir: Path, *, world_size: int) -> dict:
    """Read DIR/checkpoint.pt and check it belongs to a run of this world size."""
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"--resume: checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise InputError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint {str(path)!r}: field format: expected {CHECKPOINT_FORMAT!r}")
    if payload["world_size"] != world_size:
        raise InputError(f"checkpoint {str(path)!r}: field world_size: written by "
                         f"{payload['world_size']} ranks, this run has {world_size}")
    return payload
