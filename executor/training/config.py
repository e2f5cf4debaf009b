"""What a training run is told (TrainConfig), the checks on it before anything runs, and what
it implies: the resume mode, the algorithm's variant and its strategy."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dpkfac.core.errors import InputError
from dpkfac.core.strategy import STRATEGY_OF, TRAIN_ALGORITHMS, Strategy, parse_fraction, variant_of

from ..runtime.distributed import WorldInfo
from ..workload.data import data_entry
from .checkpoints import CHECKPOINT_NAME, checkpoint_exists
from .precision import AUTOCAST_DTYPES
from .schedule import check_schedule

RESUME_MODES = ("never", "always", "auto")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told. Learning rates are per step; times in seconds."""
    placement: str
    out_dir: str
    epochs: int = 10
    max_steps: int | None = None
    seed: int = 0
    algorithm: str = "dp-kfac"
    grad_worker_fraction: str | None = None  # KAISA only: "1" (COMM-OPT, default) or "1/P"
    model: str | None = None
    data: str | None = None      # --data SPEC (default: the placement's)
    loss: str | None = None      # --loss package.module:callable (default: the placement's)
    accumulate: int = 1          # micro-batches per optimizer step
    autocast: str | None = None  # "bf16" or "fp16": the forward under torch.autocast
    batch_size: int | None = None
    lr: float = 0.1              # base rate; the schedule scales it per step
    lr_schedule: str = "cosine"  # "cosine" (half cosine to 0 over the epochs) or "constant"
    lr_warmup_steps: int | None = None  # linear warm-up before the cosine (default none)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float = 0.03
    kl_clip: float = 0.001
    factor_decay: float = 0.95
    checkpoint_every: int | None = None
    resume: bool | str = False  # False/"never", True/"always" (needs DIR/checkpoint.pt), "auto"
    timeout_s: float = 600.0    # process-group timeout: a collective waits at most this long
    warmup_steps: int = 5
    flush_denormal: bool = True  # flush subnormal floats to zero on CPU (see runtime.cpu_runtime)
    keep_freed_memory: bool = True  # malloc keeps freed memory: no page faults (cpu_runtime)
    precise_timing: bool = False
    stagger_decompositions: bool = False
    overlap: bool = True  # owners' local phases while the gradient all-reduce is in flight
    progress: bool | None = None


def check_config(cfg: TrainConfig) -> None:
    """InputError for a flag out of range, an unusable --out folder, or a missing checkpoint
    that --resume requires (checked here only when launched as one process)."""
    if cfg.algorithm not in TRAIN_ALGORITHMS:
        raise InputError(f"unknown algorithm {cfg.algorithm!r}: expected one of "
                         f"{', '.join(TRAIN_ALGORITHMS)}")
    if cfg.grad_worker_fraction is not None:
        if cfg.algorithm != "kaisa":
            raise InputError("--grad-worker-fraction applies to --algorithm kaisa only")
        parse_fraction(cfg.grad_worker_fraction)
    for flag, value in (("--epochs", cfg.epochs), ("--max-steps", cfg.max_steps),
                        ("--checkpoint-every", cfg.checkpoint_every),
                        ("--batch-size", cfg.batch_size), ("--accumulate", cfg.accumulate)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if cfg.autocast not in (None, *AUTOCAST_DTYPES):
        raise InputError(f"--autocast {cfg.autocast!r}: expected one of "
                         f"{', '.join(AUTOCAST_DTYPES)}")
    check_schedule(cfg.lr_schedule, cfg.lr_warmup_steps)
    if not (isinstance(cfg.resume, bool) or cfg.resume in RESUME_MODES):
        raise InputError(f"--resume {cfg.resume!r}: expected one of {', '.join(RESUME_MODES)}")
    if not 0 < cfg.timeout_s < float("inf"):
        raise InputError(f"--timeout must be a positive number of seconds, got {cfg.timeout_s}")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {cfg.out_dir!r} exists and is not a folder")
    if not out.parent.is_dir():
        raise InputError(f"--out {cfg.out_dir!r}: parent folder {str(out.parent)!r} does not exist")
    if resume_mode(cfg) == "always" and not launched_world_is_multi() \
            and not checkpoint_exists(out):
        raise InputError(f"--resume: checkpoint {str(out / CHECKPOINT_NAME)!r} does not exist")


def check_world(placement: dict, world: WorldInfo, cfg: TrainConfig) -> None:
    """InputError (alike on every rank) for a KAISA HYBRID fraction or a placement made for
    another number of workers."""
    run_variant(cfg, world.world_size)
    if placement["world_size"] != world.world_size:
        raise InputError(f"placement {cfg.placement!r}: field world_size: placement is for "
                         f"{placement['world_size']} workers, this run has {world.world_size} "
                         "process(es) (launch with torchrun --nproc_per_node "
                         f"{placement['world_size']})")


def resume_mode(cfg: TrainConfig) -> str:
    """"never", "always" or "auto"; a torchrun elastic restart turns "never" into "auto"."""
    if isinstance(cfg.resume, bool):
        mode = "always" if cfg.resume else "never"
    else:
        mode = cfg.resume
    if mode == "never" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return mode


def launched_world_is_multi() -> bool:
    """True when launched with more than one process (rank 0 then checks the checkpoint, so
    ranks on machines without the file still start)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def batch_size(cfg: TrainConfig, placement: dict) -> int:
    """Samples per worker per step: --batch-size, else the placement's, else 32."""
    return cfg.batch_size or placement["config"].get("batch_size", 32)


def run_data_entry(cfg: TrainConfig, placement: dict, model_name: str) -> dict:
    """The data a run trains on: --data, else the placement's when the model is the
    placement's, else the model's own (workload.data_entry)."""
    if cfg.data is None and "data" in placement and model_name == placement["model"]:
        return placement["data"]
    return data_entry(cfg.data, model_name)


def run_variant(cfg: TrainConfig, world_size: int) -> str:
    """The algorithm as it runs: dp-kfac, mpd-kfac, kaisa-comm-opt, kaisa-mem-opt or sgd
    (InputError for a KAISA HYBRID grad-worker fraction, which is not implemented)."""
    fraction = parse_fraction(cfg.grad_worker_fraction) if cfg.grad_worker_fraction else None
    return variant_of(cfg.algorithm, workers=world_size, grad_worker_fraction=fraction)


def run_strategy(cfg: TrainConfig, world_size: int) -> Strategy | None:
    """The preconditioner's strategy, None for sgd."""
    return STRATEGY_OF.get(run_variant(cfg, world_size))
