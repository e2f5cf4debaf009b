"""A run's fingerprint: what every rank of one run, and a run resumed from its checkpoint, must
agree on (placement, model, layer names, world size, algorithm, seed, hyper-parameters), hashed
where long; and the checks that they do."""
from __future__ import annotations

import hashlib
import json

from dpkfac.core.errors import InputError

from ..runtime.distributed import WorldInfo, all_gather_object
from .config import TrainConfig, batch_size, resume_mode

# Fields a resumed run must share with the run that wrote the checkpoint (the rest, e.g. epochs
# or max_steps, may change between the two).
TRAJECTORY_KEYS = ("plan_sha256", "model", "data", "loss", "layers_sha256", "world_size",
                   "algorithm", "grad_worker_fraction", "seed", "batch_size", "accumulate",
                   "autocast", "lr", "momentum", "weight_decay", "damping", "kl_clip",
                   "factor_decay", "lr_schedule")


def run_fingerprint(cfg: TrainConfig, placement: dict, workload: dict,
                    layer_names: list[str], world: WorldInfo) -> dict:
    """What every rank of one run must agree on, hashed where long; `workload` holds the
    model's name and the data and loss entries (Workload.record())."""
    plan = {"assignment": placement["assignment"], "config": placement["config"]}
    return {
        "placement_sha256": _sha256_json(placement), "plan_sha256": _sha256_json(plan),
        "model": workload["model"], "data": workload["data"], "loss": workload["loss"],
        "layers_sha256": _sha256_json(layer_names),
        "world_size": world.world_size, "algorithm": cfg.algorithm,
        "grad_worker_fraction": cfg.grad_worker_fraction if cfg.algorithm == "kaisa" else None,
        "seed": cfg.seed,
        "batch_size": batch_size(cfg, placement), "accumulate": cfg.accumulate,
        "autocast": cfg.autocast,
        "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
        "damping": cfg.damping, "kl_clip": cfg.kl_clip, "factor_decay": cfg.factor_decay,
        "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "checkpoint_every": cfg.checkpoint_every, "resume": resume_mode(cfg),
        "flush_denormal": cfg.flush_denormal,
    }


def agree_on_fingerprint(fingerprint: dict, world: WorldInfo) -> None:
    """InputError on every rank, before any training, unless all ranks' fingerprints match."""
    prints = all_gather_object(fingerprint, world)
    for key in fingerprint:
        values = [p.get(key) for p in prints]
        if len({json.dumps(v) for v in values}) > 1:
            shown = ", ".join(f"rank {r} has {_short(v)}" for r, v in enumerate(values))
            raise InputError(f"ranks disagree at start-up, nothing was trained: field {key}: "
                             f"{shown} (every rank must get the same placement, model and flags)")


def check_trajectory(saved: dict, mine: dict, where: str) -> None:
    """InputError unless the checkpoint was written by a run this one can continue exactly."""
    for key in TRAJECTORY_KEYS:
        if saved.get(key) != mine[key]:
            raise InputError(f"{where}: field fingerprint/{key}: the checkpoint was written with "
                             f"{_short(saved.get(key))}, this run has {_short(mine[key])} "
                             "(resume with the same placement, model, seed and hyper-parameters)")


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _short(value: object) -> str:
    """repr of `value`, a SHA-256 hex digest cut to its first 12 characters."""
    text = repr(value)
    return text[:14] + "...'" if isinstance(value, str) and len(value) == 64 else text
