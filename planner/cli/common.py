"""What the planner's commands share: output checks and the console."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from dpkfac.core.errors import InputError


def checked_output(path: str) -> Path:
    """The output path, after checking its folder exists and it is not a folder itself."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    if out.is_dir():
        raise InputError(f"output {str(out)!r} is a folder; expected a file name")
    return out


def make_console() -> Console:
    """A rich console at least 100 columns wide, so piped tables are not cut at 80."""
    detected = Console()
    return Console(width=max(detected.width, 100)) if not detected.is_terminal else detected
