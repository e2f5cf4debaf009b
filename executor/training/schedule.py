"""The learning-rate schedule of `dpkfac train`: a pure function of the optimizer step, so a
resumed run sets exactly the rate the uninterrupted run had.

"cosine" (the default): a half cosine from the base rate to 0 at `horizon_steps` (the steps of
all --epochs, not --max-steps, so a run stopped early and resumed follows the same curve), after
an optional linear warm-up of `warmup_steps` steps. "constant": the base rate at every step.

No warm-up by default: the KL clip already bounds every early step, and while it is active its
scale goes as 1/lr, so during a warm-up SGD's momentum buffer fills with gradients scaled for a
small rate that the full rate then multiplies (measured on digits-cnn: a 5% warm-up made the loss
spike to 28-165 where without it none passed 8; docs/commands.md, train)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpkfac.core.errors import InputError

LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base learning rate at each step (0-based)."""
    kind: str = "cosine"
    warmup_steps: int = 0
    horizon_steps: int = 1

    @classmethod
    def of(cls, kind: str, horizon_steps: int, warmup_steps: int | None = None) -> LRSchedule:
        """The schedule for a run of `horizon_steps` steps (warm-up: cosine only, default
        none)."""
        check_schedule(kind, warmup_steps)
        horizon = max(1, horizon_steps)
        if kind == "constant":
            return cls(kind, 0, horizon)
        return cls(kind, min(warmup_steps or 0, horizon - 1), horizon)

    def factor(self, step: int) -> float:
        """The base rate's multiplier at `step`: in (0, 1]; 0 only past the horizon."""
        if self.kind == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = self.horizon_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def record(self) -> dict:
        """JSON-ready fields (checkpoint fingerprint and summary)."""
        return asdict(self)


def check_schedule(kind: str, warmup_steps: int | None) -> None:
    """InputError for an unknown --lr-schedule or a negative --lr-warmup-steps."""
    if kind not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule {kind!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if warmup_steps is not None and warmup_steps < 0:
        raise InputError(f"--lr-warmup-steps must be >= 0, got {warmup_steps}")


def set_learning_rate(optimizer, base_lr: float, schedule: LRSchedule, step: int) -> float:
    """Set every parameter group's rate for `step`; returns it."""
    lr = base_lr * schedule.factor(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
