"""Two nodes of an emulated cluster (dpkfac.emulation: network namespaces through a bridge,
links shaped to 1 Gbit/s), one torchrun agent each, c10d rendezvous: training gives identical
parameters, and a job whose second node is killed restarts from its checkpoint bit-exactly.
Skipped where the emulated cluster cannot be built."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dpkfac.emulation import EmulatedCluster, emulation_unavailable
from executor_fixtures import placement_dict
from test_resume_kill import kill_tree

STEPS, EVERY = 120, 7
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def nodes():
    """Two emulated nodes; always removed."""
    reason = emulation_unavailable()
    if reason:
        pytest.skip(f"no emulated cluster: {reason}")
    with EmulatedCluster(nodes=2, rate="1gbit") as cluster:
        yield cluster


def _job(cluster: EmulatedCluster, run_id: str, args: list[str]) -> list:
    return cluster.launch(["-m", "dpkfac.cli", "train", *args], env=ENV, rendezvous_id=run_id)


def _finish(procs: list, timeout: float = 240) -> None:
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(e[-2000:] for e in errors)


def _args(placement: Path, out: Path, *extra: str) -> list[str]:
    return ["--placement", str(placement), "--out", str(out), "--max-steps", str(STEPS),
            "--checkpoint-every", str(EVERY), "--no-progress", "--timeout", "20", *extra]


@pytest.fixture(scope="module")
def reference(nodes, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    placement = root / "placement.json"
    placement.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 1, "5": 0}, 2)))
    out = root / "full"
    _finish(_job(nodes, "full", _args(placement, out)))
    return root, placement, json.loads((out / "summary.json").read_text())


def test_two_nodes_train_identical_parameters(reference):
    _, _, summary = reference
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["parameters_identical"] is True


def test_node_killed_then_job_restarted_from_checkpoint(nodes, reference):
    root, placement, full = reference
    out = root / "killed"
    procs = _job(nodes, "killed", _args(placement, out))
    metrics = out / "metrics.jsonl"
    end = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 40):
        assert time.monotonic() < end and all(p.poll() is None for p in procs)
        time.sleep(0.002)
    kill_tree(procs[1])  # node b: its agent and its worker
    _, err = procs[0].communicate(timeout=60)  # node a notices within the timeout and stops
    assert procs[0].returncode != 0
    assert "collective communication failed at step" in err, err[-2000:]
    assert not (out / "summary.json").exists()
    _finish(_job(nodes, "resumed", _args(placement, out, "--resume")))
    got = json.loads((out / "summary.json").read_text())
    assert got["parameters_identical"] is True
    assert got["parameter_sha256"] == full["parameter_sha256"]
