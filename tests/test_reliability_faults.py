"""Hangs and faults: a killed or stuck rank ends the job within the process-group timeout with a
message naming the step and phase; ranks given different inputs stop before training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_helpers import free_port
from executor_fixtures import placement_dict

TIMEOUT_S = 5


def _launch(rank_args: list[list[str]]) -> list[subprocess.Popen]:
    """One `dpkfac train` process per rank, env:// rendezvous on loopback (no torchrun agent,
    so nothing tears the survivors down but their own timeout)."""
    port = free_port()
    procs = []
    for rank, args in enumerate(rank_args):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(len(rank_args)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "dpkfac.cli", "train", *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _placement(tmp: Path, name: str, assignment: dict) -> Path:
    path = tmp / name
    path.write_text(json.dumps(placement_dict("digits-mlp", assignment, 2)))
    return path


def _wait_for_lines(path: Path, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {n} lines")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stuck"])
def test_dead_or_stuck_rank_ends_the_job_within_the_timeout(tmp_path, how):
    placement = _placement(tmp_path, "p.json", {"1": 0, "3": 1, "5": 0})
    args = ["--placement", str(placement), "--out", str(tmp_path / "run"), "--epochs", "200",
            "--timeout", str(TIMEOUT_S), "--no-progress"]
    survivor, victim = _launch([args, args])
    try:
        _wait_for_lines(tmp_path / "run" / "metrics.jsonl", 10)
        started = time.monotonic()
        victim.send_signal(how)
        _, err = survivor.communicate(timeout=TIMEOUT_S + 30)
        elapsed = time.monotonic() - started
    finally:
        victim.kill()
        victim.communicate()
        if survivor.poll() is None:
            survivor.kill()
    last = err.strip().splitlines()[-1]
    assert survivor.returncode == 1, err[-2000:]
    assert elapsed < TIMEOUT_S + 10, elapsed
    assert last.startswith("error: rank 0 of 2: collective communication failed at step "), last
    assert "phase " in last and f"timeout {TIMEOUT_S} s" in last and "Traceback" not in err


def test_ranks_with_different_placements_stop_before_training(tmp_path):
    first = _placement(tmp_path, "a.json", {"1": 0, "3": 1, "5": 0})
    second = _placement(tmp_path, "b.json", {"1": 0, "3": 1, "5": 1})
    common = ["--out", str(tmp_path / "run"), "--max-steps", "3", "--timeout", "60",
              "--no-progress"]
    procs = _launch([["--placement", str(first), *common], ["--placement", str(second), *common]])
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 2, err[-2000:]
        assert last.startswith("error: ranks disagree at start-up, nothing was trained: "
                               "field placement_sha256: rank 0 has"), last
    assert not (tmp_path / "run").exists()


def test_ranks_with_different_algorithms_stop_before_training(tmp_path):
    placement = _placement(tmp_path, "p.json", {"1": 0, "3": 1, "5": 0})
    common = ["--placement", str(placement), "--out", str(tmp_path / "run"), "--max-steps", "3",
              "--no-progress"]
    procs = _launch([[*common, "--algorithm", "sgd"], common])
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [p.returncode for p in procs] == [2, 2], errors
    assert all("field algorithm: rank 0 has 'sgd', rank 1 has 'dp-kfac'" in e for e in errors)
