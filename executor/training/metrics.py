"""What a run shows as it goes: metrics.jsonl (one JSON object per step, on rank 0) and the
progress bar."""
from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

from dpkfac.core.jsonio import write_atomic

from ..runtime.distributed import WorldInfo


class MetricsLog:
    """metrics.jsonl on rank 0: one JSON object per step, flushed as it goes."""

    def __init__(self, path: Path, *, enabled: bool, append: bool) -> None:
        self._fh = open(path, "a" if append else "w", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def truncate_metrics(path: Path, *, before_step: int) -> None:
    """Keep only the metrics lines of steps before `before_step` (a killed run may have logged
    steps after its last checkpoint, or half a line); rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] < before_step:
            kept.append(line + "\n")
    write_atomic(path, lambda fh: fh.writelines(kept))


def progress_bar(wanted: bool | None, world: WorldInfo, total: int, done: int):
    """A rich progress bar of `total` steps, `done` of them done, on rank 0 when attached to a
    terminal (or when `wanted`); a null context otherwise."""
    wanted = wanted if wanted is not None else sys.stderr.isatty()
    if world.rank != 0 or not wanted:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), TimeRemainingColumn(), transient=False)
    bar.add_task("", total=total, completed=done)
    return bar


def advance(bar, loss: float | None) -> None:
    """One step done, showing its loss."""
    if bar is not None:
        text = "loss skipped (not finite)" if loss is None else f"loss {loss:.3f}"
        bar.update(bar.task_ids[0], advance=1, description=text)
