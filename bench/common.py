"""Helpers the benchmarks share: run `dpkfac` as a user would, alone or under torchrun."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def dpkfac_command(workers: int, *args: str) -> list[str]:
    """`dpkfac ARGS` as one process (workers == 1) or under torchrun with `workers` processes."""
    if workers == 1:
        return [sys.executable, "-m", "dpkfac.cli", *args]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", str(workers), "-m", "dpkfac.cli", *args]


def run_timed(cmd: list[str], *, capture: bool = False) -> tuple[float, str]:
    """Run a command (failing loudly); its wall seconds and, if asked, its standard output."""
    start = time.perf_counter()
    result = subprocess.run(cmd, check=True, text=True,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
                                "OMP_NUM_THREADS", "1")))
    return time.perf_counter() - start, result.stdout or ""
