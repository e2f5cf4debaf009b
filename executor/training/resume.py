"""Saving a run's state at a step and resuming from it exactly: where training starts (step 0
or the checkpoint's position), restoring every rank's objects, all ranks agreeing on failure."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from dpkfac.core.errors import InputError

from ..runtime.distributed import WorldInfo, all_gather_object, broadcast_object
from .checkpoints import (
    CHECKPOINT_NAME,
    checkpoint_exists,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .fingerprint import check_trajectory


def save_run(out: Path, world: WorldInfo, model, optimizer, precond, step: int,
             here: tuple[int, int], fingerprint: dict, skipped: int, *, scaler=None) -> None:
    """Write DIR/checkpoint.pt after `step` steps; `here` is (epoch, batch index) of the next
    step's batch, `skipped` the steps skipped so far, `scaler` a loss scaler (fp16) or None."""
    common = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
              "epoch": here[0], "batch_in_epoch": here[1], "skipped_steps": skipped,
              "fingerprint": fingerprint}
    if scaler is not None:
        common["grad_scaler"] = scaler.state_dict()
    per_rank = {"preconditioner": precond.state_dict() if precond is not None else None,
                "rng": rng_state()}
    save_checkpoint(out, rank=world.rank, world_size=world.world_size, common=common,
                    per_rank=per_rank)


def start_state(mode: str, checkpoint_every: int | None, out: Path, world: WorldInfo, model,
                optimizer, precond, fingerprint: dict, *, scaler=None) -> dict:
    """Where training starts: step 0, or the restored checkpoint's position (exact resume).
    `mode` is the resume mode ("never", "always", "auto")."""
    payload = _shared_checkpoint(out, world, mode)
    fresh = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "resumed": False}
    if payload is None:
        if world.rank == 0 and checkpoint_every and checkpoint_exists(out):
            (out / CHECKPOINT_NAME).unlink()  # a fresh run: an old checkpoint must not be resumed
        return fresh
    where = f"checkpoint {str(out / CHECKPOINT_NAME)!r}"
    check_trajectory(payload["fingerprint"], fingerprint, where)
    agree(world, lambda: _restore(payload, world, model, optimizer, precond, where, scaler))
    if world.rank == 0 and payload.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        print(f"warning: {where} was written with {payload['threads']} thread(s) per process, "
              f"this run has {torch.get_num_threads()}: the continuation may differ from an "
              "uninterrupted run in the last bits (set OMP_NUM_THREADS to match)", file=sys.stderr)
    return {"step": payload["step"], "epoch": payload["epoch"],
            "batch_in_epoch": payload["batch_in_epoch"],
            "skipped_steps": int(payload.get("skipped_steps", 0)), "resumed": True}


def _shared_checkpoint(out: Path, world: WorldInfo, mode: str) -> dict | None:
    """Rank 0 reads and validates DIR/checkpoint.pt (when `mode` asks for it) and hands it to
    every rank; None for a fresh start. An unusable checkpoint is an InputError on all ranks."""
    answer: tuple[str, object] = ("fresh", None)
    if world.rank == 0:
        try:
            if out.is_dir():
                remove_stale_temporaries(out)
            if mode == "always" or (mode == "auto" and checkpoint_exists(out)):
                answer = ("ok", load_checkpoint(out, world_size=world.world_size))
        except InputError as exc:
            answer = ("error", str(exc))
    status, value = broadcast_object(answer, world)
    if status == "error":
        raise InputError(value)
    return value


def _restore(payload: dict, world: WorldInfo, model, optimizer, precond, where: str,
             scaler=None) -> None:
    """Load the checkpoint's state into this rank's objects; a misfit is an InputError."""
    mine = payload["ranks"][world.rank]
    steps = [("model", lambda: model.load_state_dict(payload["model"])),
             ("optimizer", lambda: optimizer.load_state_dict(payload["optimizer"])),
             (f"ranks/{world.rank}/rng", lambda: set_rng_state(mine["rng"]))]
    if scaler is not None:
        steps.append(("grad_scaler", lambda: scaler.load_state_dict(payload["grad_scaler"])))
    if precond is not None:
        steps.append((f"ranks/{world.rank}/preconditioner",
                      lambda: precond.load_state_dict(mine["preconditioner"]
                                                      or {"steps": 0, "blocks": {}})))
    for field, load in steps:
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise InputError(f"{where}: field {field}: does not fit this run: {detail}") from None


def agree(world: WorldInfo, action: Callable[[], None]) -> None:
    """Run `action` on every rank; if it raised InputError on any rank, raise the first such
    error on all of them (so no rank trains on while another has given up)."""
    error = None
    try:
        action()
    except InputError as exc:
        error = str(exc)
    errors = [e for e in all_gather_object(error, world) if e is not None]
    if errors:
        raise InputError(errors[0])
