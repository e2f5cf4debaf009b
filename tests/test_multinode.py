"""Two "nodes" as network namespaces joined by a veth pair (10.213.x.0/24, made and removed
here), one torchrun agent each, c10d rendezvous: training gives identical parameters, and a job
whose second node is killed restarts from its checkpoint bit-exactly. Skipped where `ip netns`
is not permitted."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor_fixtures import placement_dict
from test_resume_kill import kill_tree

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
STEPS, EVERY = 120, 7
SUBNET = f"10.213.{os.getpid() % 200 + 20}"
PORT = 29400 + os.getpid() % 500


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def nodes():
    """[(namespace, interface, address)] for two nodes; always cleaned up."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command is not installed")
    tag = f"{os.getpid() % 100000}"
    made = [(f"dpkfac-a{tag}", f"dpka{tag}", f"{SUBNET}.1"),
            (f"dpkfac-b{tag}", f"dpkb{tag}", f"{SUBNET}.2")]
    try:
        for ns, _, _ in made:
            result = _ip("netns", "add", ns)
            if result.returncode != 0:
                pytest.skip(f"`ip netns add` is not permitted here: {result.stderr.strip()}")
        (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) = made
        steps = [("link", "add", if_a, "type", "veth", "peer", "name", if_b),
                 ("link", "set", if_a, "netns", ns_a), ("link", "set", if_b, "netns", ns_b),
                 ("-n", ns_a, "addr", "add", f"{addr_a}/24", "dev", if_a),
                 ("-n", ns_b, "addr", "add", f"{addr_b}/24", "dev", if_b),
                 ("-n", ns_a, "link", "set", "lo", "up"), ("-n", ns_b, "link", "set", "lo", "up"),
                 ("-n", ns_a, "link", "set", if_a, "up"), ("-n", ns_b, "link", "set", if_b, "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` is not permitted here: {result.stderr.strip()}")
        yield made
    finally:
        for ns, _, _ in made:
            _ip("netns", "del", ns)  # removes the veth ends inside it too


def _node(node: tuple[str, str, str], host: tuple[str, str, str], run_id: str,
          args: list[str]) -> subprocess.Popen:
    """One torchrun agent (1 process) inside the node's namespace, in its own session."""
    ns, iface, addr = node
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=iface)
    cmd = ["ip", "netns", "exec", ns, TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{host[2]}:{PORT}", "--rdzv_id", run_id,
           "--rdzv_conf", f"is_host={int(node == host)}", "--local-addr", addr,
           "-m", "dpkfac.cli", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _job(nodes, run_id: str, args: list[str]) -> list[subprocess.Popen]:
    return [_node(n, nodes[0], run_id, args) for n in nodes]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> None:
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
