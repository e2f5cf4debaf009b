"""Checkpoints: everything needed to continue a run exactly, written atomically by rank 0.

DIR/checkpoint.pt is a torch.save'd dict (format dpkfac.checkpoint/2) holding only tensors and
plain Python values, so it loads with `torch.load(weights_only=True)` (no arbitrary pickle runs)
and is checked against CHECKPOINT_SCHEMA (jsonschema, with a "tensor" type) before any of it is
used. Rank 0 reads it and hands it to the other ranks, so other machines need not see the file.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import jsonschema.validators
import numpy as np
import torch

from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import StrictValidator, validate, write_atomic
from dpkfac.core.schemas import CHECKPOINT_FORMAT, CHECKPOINT_SCHEMA

from ..runtime.distributed import gather_to_rank0

CHECKPOINT_NAME = "checkpoint.pt"


def _is_tensor(checker: Any, instance: Any) -> bool:
    return isinstance(instance, torch.Tensor)


def _is_array(checker: Any, instance: Any) -> bool:
    return isinstance(instance, (list, tuple))


CheckpointValidator = jsonschema.validators.extend(
    StrictValidator,
    type_checker=StrictValidator.TYPE_CHECKER.redefine_many(
        {"tensor": _is_tensor, "array": _is_array}),
)


def rng_state() -> dict:
    """This process's random number generator states (python, numpy, torch CPU and CUDA), as
    tensors and plain values only (numpy's key array travels as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, *, rank: int, world_size: int, common: dict,
                    per_rank: dict) -> None:
    """Gather per-rank state to rank 0, which writes DIR/checkpoint.pt atomically (temporary
    file in DIR, fsync, rename: a crash mid-write leaves the previous checkpoint intact).

    `common` is identical on every rank (model, optimizer, step, epoch, fingerprint); `per_rank`
    holds what differs (preconditioner state of owned layers, RNG states).
    """
    gathered = gather_to_rank0(per_rank, rank=rank, world_size=world_size)
    if rank != 0:
        return
    payload = dict(common, format=CHECKPOINT_FORMAT, world_size=world_size, ranks=gathered,
                   threads=torch.get_num_threads())
    write_atomic(out_dir / CHECKPOINT_NAME, lambda fh: torch.save(payload, fh), binary=True)


def read_checkpoint(path: Path, *, world_size: int) -> dict:
    """Load and validate one checkpoint file for a run of `world_size` ranks.

    Any problem (missing, unreadable, corrupt, not a checkpoint, wrong format version, missing
    or mistyped fields, another world size) raises InputError naming the file and the field.
    """
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where} does not exist")
    try:
        with warnings.catch_warnings():  # a damaged file is reported below, not warned about
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or hostile file
        first = " ".join(str(exc).split())[:200]
        raise InputError(f"{where} cannot be read (not a dpkfac checkpoint, or damaged): "
                         f"{type(exc).__name__}: {first}") from None
    if isinstance(payload, dict) and "format" in payload and payload["format"] != CHECKPOINT_FORMAT:
        raise InputError(f"{where}: field format: expected {CHECKPOINT_FORMAT!r}, "
                         f"got {payload['format']!r}")
    validate(payload, CHECKPOINT_SCHEMA, source=where, validator=CheckpointValidator)
    if payload["world_size"] != world_size or len(payload["ranks"]) != world_size:
        raise InputError(f"{where}: field world_size: written by {payload['world_size']} "
                         f"rank(s) with {len(payload['ranks'])} rank state(s), this run has "
                         f"{world_size}")
    return payload


def checkpoint_exists(out_dir: Path) -> bool:
    """True when DIR/checkpoint.pt is there."""
    return (out_dir / CHECKPOINT_NAME).is_file()


def load_checkpoint(out_dir: Path, *, world_size: int) -> dict:
    """Read and validate DIR/checkpoint.pt (see read_checkpoint)."""
    return read_checkpoint(out_dir / CHECKPOINT_NAME, world_size=world_size)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files a write killed half-way left in DIR (.checkpoint.pt.*.tmp)."""
    for tmp in out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        tmp.unlink(missing_ok=True)
