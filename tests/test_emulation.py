"""The emulated cluster (dpkfac.emulation): namespaces joined through a bridge by tbf-shaped
links, built and always removed; a clear skip reason where it cannot be built; the link's rate
is what a transfer gets; a terminated holder leaves no job and no namespace behind; a profile
measured across the nodes sees the link, and its prediction of a DP-KFAC step holds there."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpkfac import emulation
from dpkfac.core.units import payload_bytes_per_s
from dpkfac.emulation import TBF_BURST_S, EmulatedCluster, emulation_unavailable, tbf_burst_bytes

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
    """Bytes per second of the best of three TCP transfers from node `src` to node `dst` (the
    link's capacity; a shared host slows single transfers by up to 40%)."""
    return max(_transfer_rate(cluster, src, dst, nbytes) for _ in range(3))


def _transfer_rate(cluster: EmulatedCluster, src: int, dst: int, nbytes: int) -> float:
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
        nbytes = 6 << 20
        rate = _throughput(cluster, 0, 2, nbytes)  # through the bridge, two shaped links
        # 100 Mbit/s = 12.5 MB/s on the wire, of which the headers leave 11.96 to the payload
        # (a transfer measured 11.9 on a quiet host, 9.0 while other jobs used its 2 cores);
        # the token bucket's bytes go at once
        payload = payload_bytes_per_s("100mbit")
        fastest = payload * nbytes / (nbytes - tbf_burst_bytes("100mbit"))
        assert 0.7 * payload < rate < 1.02 * fastest
        cluster.set_rate("400mbit")
        assert _throughput(cluster, 2, 1, 12 << 20) > 30e6
    assert not made & _namespaces()


@needs_emulation
def test_a_link_keeps_its_rate_while_the_cores_are_busy():
    """tbf refills its bucket on timer wake-ups, which a busy host delays; the bucket must
    outlast them, or the link runs below its rate by what the host's load makes it (with a
    0.25 ms bucket, 8 MiB transfers at 400 Mbit/s ran at 34.6-48.3 MB/s, medians of three
    40.2 and 46.0, 84% and 96% of what the link allows; with 5 ms, 49.2-49.3, 100%)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with EmulatedCluster(nodes=2, rate="400mbit", name="dpktestbusy") as cluster:
            rates = sorted(_transfer_rate(cluster, 0, 1, 8 << 20) for _ in range(3))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    fastest = payload_bytes_per_s("400mbit") * (8 << 20) / ((8 << 20) - tbf_burst_bytes("400mbit"))
    assert rates[1] > 0.97 * fastest, rates


@needs_emulation
def test_namespaces_are_removed_when_building_fails():
    cluster = EmulatedCluster(nodes=2, rate="not-a-rate", name="dpktestbad")
    with pytest.raises(emulation.EmulationError, match="tbf"):
        cluster.up()
    assert not {n for n in _namespaces() if n.startswith("dpktestbad")}


TERMINATED_JOB = """
import time
from dpkfac.emulation import EmulatedCluster
with EmulatedCluster(nodes=2, rate="100mbit", name="dpktestterm") as cluster:
    cluster.launch(["--no-python", "sleep", "987"])
    print("ready", flush=True)
    time.sleep(600)
"""


def _sleepers() -> str:
    return subprocess.run(["pgrep", "-f", "sleep 987"], capture_output=True, text=True).stdout


@needs_emulation
def test_sigterm_kills_the_jobs_and_removes_the_namespaces():
    """A process holding an emulated cluster with a job running on its nodes, terminated: the
    job's workers are gone and so are the namespaces."""
    holder = subprocess.Popen([sys.executable, "-c", TERMINATED_JOB], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        deadline = time.monotonic() + 60
        while len(_sleepers().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # torchrun starts each node's worker
        assert len(_sleepers().split()) == 2
        holder.terminate()
        assert holder.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        holder.kill()
    assert not {n for n in _namespaces() if n.startswith("dpktestterm")}
    assert _sleepers() == ""


@needs_emulation
def test_profile_across_shaped_nodes_predicts_the_dp_kfac_step(tmp_path: Path):
    """profile -> plan -> train across 2 nodes at 100 Mbit/s: the profile's all-reduce pays the
    link, and the placement's predicted step (no calibration) is near the measured one (a loose
    guard; bench/network.py holds the 10% floors: this host's speed drifts by up to 40% over
    minutes, so a run that misses is repeated once). The profile knows the link rate, so the
    overlapped step's prediction may hide the all-reduce's wire time, as the run does."""
    from dpkfac.cli import main

    env = {"OMP_NUM_THREADS": "1"}
    with EmulatedCluster(nodes=2, rate="100mbit", name="dpktestjob") as cluster:
        profile, placement, run = tmp_path / "p.json", tmp_path / "pl.json", tmp_path / "run"
        for result in cluster.torchrun(["-m", "dpkfac.cli", "profile", "--model", "digits-cnn",
                                        "--batch-size", "32", "--out", str(profile),
                                        "--repeats", "5", "--link-rate", "100mbit",
                                        "--link-burst", str(tbf_burst_bytes("100mbit"))],
                                       env=env, timeout_s=300):
            assert result.returncode == 0, result.stderr[-3000:]
        comm = json.loads(profile.read_text())["comm"]
        one_mib = comm["allreduce"]["seconds"][comm["message_bytes"].index(1 << 20)]
        assert one_mib > 0.8 * (1 << 20) / 12.5e6, one_mib  # the link, not loopback
        assert comm["link_bytes_per_s"] == pytest.approx(payload_bytes_per_s("100mbit"))
        assert comm["link_burst_s"] == pytest.approx(TBF_BURST_S)
        assert 0 < comm["link_idle_s"] < 0.5  # the forward/backward before each timed call
        assert main(["plan", "--profile", str(profile), "--workers", "2",
                     "--out", str(placement)]) == 0
        predicted = json.loads(placement.read_text())["predicted"]["step_time_s"]
        run.mkdir()
        errors = []
        for attempt in range(2):  # a second run only when the first met a slow spell
            out = run / str(attempt)
            for result in cluster.torchrun(["-m", "dpkfac.cli", "train", "--placement",
                                            str(placement), "--out", str(out), "--max-steps",
                                            "60", "--no-progress"], env=env, timeout_s=300):
                assert result.returncode == 0, result.stderr[-3000:]
            measured = json.loads((out / "summary.json").read_text())["mean_step_time_s"]
            errors.append(predicted / measured - 1)
            if abs(errors[-1]) < 0.3:
                break
    assert min(abs(e) for e in errors) < 0.3, (predicted, errors)
