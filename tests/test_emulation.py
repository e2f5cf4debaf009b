"""The emulated cluster (dpkfac.emulation): namespaces joined through a bridge by tbf-shaped
links, built and always removed; a clear skip reason where it cannot be built; the link's rate
is what a transfer gets; a profile measured across the nodes sees the link, and its prediction
of a DP-KFAC step holds there."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpkfac import emulation
from dpkfac.emulation import EmulatedCluster, emulation_unavailable

REASON = emulation_unavailable()
needs_emulation = pytest.mark.skipif(REASON is not None, reason=f"no emulated cluster: {REASON}")

RECEIVER = """
import socket, sys, time
server = socket.socket(); server.bind((sys.argv[1], 5001)); server.listen(1)
print("ready", flush=True)
conn, _ = server.accept(); total, start = 0, None
while True:
    chunk = conn.recv(1 << 20)
    start = start or time.perf_counter()
    if not chunk:
        break
    total += len(chunk)
print(total / (time.perf_counter() - start))
"""
SENDER = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 5001)); sock.sendall(b"x" * int(sys.argv[2]))
sock.close()
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _throughput(cluster: EmulatedCluster, src: int, dst: int, nbytes: int) -> float:
    """Bytes per second of one TCP transfer from node `src` to node `dst`."""
    address = cluster.address(dst)
    receiver = subprocess.Popen(["ip", "netns", "exec", cluster.namespace(dst), sys.executable,
                                 "-c", RECEIVER, address], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    subprocess.run(["ip", "netns", "exec", cluster.namespace(src), sys.executable, "-c", SENDER,
                    address, str(nbytes)], check=True, timeout=60)
    out, _ = receiver.communicate(timeout=60)
    return float(out)


def test_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(emulation.os, "geteuid", lambda: 1000)
    assert emulation_unavailable() == "network namespaces and tc need root"
    monkeypatch.setattr(emulation.os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulation.shutil, "which", lambda tool: None)
    assert emulation_unavailable() == "ip and tc not found (iproute2)"


@needs_emulation
def test_three_nodes_through_a_bridge_are_built_shaped_and_removed():
    cluster = EmulatedCluster(nodes=3, rate="100mbit", name="dpktest3")
    with cluster:
        made = {cluster.hub, *(cluster.namespace(i) for i in range(3))}
        assert made <= _namespaces()
        rate = _throughput(cluster, 0, 2, 3 << 20)  # through the bridge, two shaped links
        assert 9e6 < rate < 13.5e6, rate            # 100 Mbit/s = 12.5 MB/s on the wire
        cluster.set_rate("400mbit")
        assert _throughput(cluster, 2, 1, 12 << 20) > 30e6
    assert not made & _namespaces()


@needs_emulation
def test_namespaces_are_removed_when_building_fails():
    cluster = EmulatedCluster(nodes=2, rate="not-a-rate", name="dpktestbad")
    with pytest.raises(emulation.EmulationError, match="tbf"):
        cluster.up()
    assert not {n for n in _namespaces() if n.startswith("dpktestbad")}


@needs_emulation
def test_profile_across_shaped_nodes_predicts_the_dp_kfac_step(tmp_path: Path):
    """profile -> plan -> train across 2 nodes at 100 Mbit/s: the profile's all-reduce pays the
    link, and the placement's predicted step (no calibration) is near the measured one (a loose
    guard; bench/network.py holds the 10% floors). The profile knows the link rate, so the
    overlapped step's prediction may hide the all-reduce's wire time, as the run does."""
    from dpkfac.cli import main

    env = {"OMP_NUM_THREADS": "1"}
    with EmulatedCluster(nodes=2, rate="100mbit", name="dpktestjob") as cluster:
        profile, placement, run = tmp_path / "p.json", tmp_path / "pl.json", tmp_path / "run"
        for result in cluster.torchrun(["-m", "dpkfac.cli", "profile", "--model", "digits-cnn",
                                        "--batch-size", "32", "--out", str(profile),
                                        "--repeats", "5", "--link-rate", "100mbit"],
                                       env=env, timeout_s=300):
            assert result.returncode == 0, result.stderr[-3000:]
        comm = json.loads(profile.read_text())["comm"]
        one_mib = comm["allreduce"]["seconds"][comm["message_bytes"].index(1 << 20)]
        assert one_mib > 0.8 * (1 << 20) / 12.5e6, one_mib  # the link, not loopback
        assert main(["plan", "--profile", str(profile), "--workers", "2",
                     "--out", str(placement)]) == 0
        for result in cluster.torchrun(["-m", "dpkfac.cli", "train", "--placement",
                                        str(placement), "--out", str(run), "--max-steps", "60",
                                        "--no-progress"], env=env, timeout_s=300):
            assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads(placement.read_text())["predicted"]["step_time_s"]
    measured = json.loads((run / "summary.json").read_text())["mean_step_time_s"]
    assert abs(predicted / measured - 1) < 0.3, (predicted, measured)
