"""Faults of a running job (a dead or stuck rank, a collective that timed out), told apart from
bad input. Imports no torch, so the command line can catch RunFault cheaply."""
from __future__ import annotations

import re
from dataclasses import dataclass


class RunFault(Exception):
    """The job cannot go on: another rank died or hung, a collective failed or timed out. The
    command line prints it as one `error:` line and exits with status 1 (bad input is 2), so a
    launcher such as torchrun --max-restarts can restart the job."""


@dataclass
class RunPosition:
    """Where a run is, for fault messages: the step (0-based) and the phase within it."""
    step: int = 0
    phase: str = "start-up"

    def at(self, phase: str, step: int | None = None) -> None:
        """Record that `phase` (of `step`, if given) starts now."""
        self.phase = phase
        if step is not None:
            self.step = step

    def describe(self) -> str:
        """`step N, phase P` for messages."""
        return f"step {self.step}, phase {self.phase}"


def fault_message(*, rank: int, world_size: int, position: RunPosition, timeout_s: float,
                  cause: BaseException) -> str:
    """One line saying which rank stopped where, why, and what to look at next."""
    detail = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(cause).split()))  # drop [file.cc:123]
    detail = detail[:240] or type(cause).__name__
    return (f"rank {rank} of {world_size}: collective communication failed at "
            f"{position.describe()} (process-group timeout {timeout_s:g} s): {detail}. Another "
            "rank has probably died or hung; see its output. Resume with --resume (or "
            "--resume auto) from the last checkpoint.")
