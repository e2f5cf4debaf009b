"""Run the `dpkfac` command as a user does: one process, or under torchrun with N processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_dpkfac(*args: str, torchrun: int | None = None, env: dict | None = None,
               cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`dpkfac ARGS` (`python -m dpkfac.cli`), under `torchrun --standalone --nproc_per_node
    N` when `torchrun` is N; output captured, environment `env` (default: ours, one thread)."""
    if torchrun:
        launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [launcher, "--standalone", "--nproc_per_node", str(torchrun), "-m", "dpkfac.cli"]
    else:
        cmd = [sys.executable, "-m", "dpkfac.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV if env is None else env, cwd=cwd)
