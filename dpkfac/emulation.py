"""An emulated cluster on one Linux host: N nodes as network namespaces joined through a bridge
by veth links rate-limited with tc tbf, and one torchrun agent per node (c10d rendezvous), so a
multi-node job meets a real, shaped link instead of loopback. Needs root (or CAP_NET_ADMIN),
`ip` and `tc`; `emulation_unavailable()` says why not where they are missing. The standard
library only: no torch here.

    with EmulatedCluster(nodes=2, rate="100mbit") as cluster:
        results = cluster.torchrun(["-m", "dpkfac.cli", "profile", ...])
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dpkfac.core.errors import InputError
from dpkfac.core.units import parse_link_rate

RENDEZVOUS_PORT = 29400
TBF_LATENCY = "200ms"    # how long a packet may queue before tbf drops it
# a link may send this many seconds' worth at line rate after idling: tbf refills its bucket
# when its timer fires, and on a busy host the timer fires late; whatever would overflow the
# bucket meanwhile is lost, so a bucket shorter than the lateness runs the link below its rate
# by an amount that follows the host's load (at 0.25 ms, 4 MiB at 400 Mbit/s took 95-245 ms
# where the rate allows 88; at 5 ms, 86-87 ms, and a 1.18 MB all-reduce at 100 Mbit/s 97-99 ms
# where it took 104-180)
TBF_BURST_S = 5e-3
TBF_MIN_BURST = 4 << 10  # bytes: and never less (a few full-size packets)


def rate_bytes_per_s(rate: str) -> float:
    """A tc rate ("100mbit", "1gbit", "800kbit") in bytes per second; ValueError otherwise."""
    try:
        return parse_link_rate(rate)
    except InputError as exc:
        raise ValueError(str(exc)) from None


def tbf_burst_bytes(rate: str) -> int:
    """The token bucket of a link of `rate`, bytes: TBF_BURST_S of its bandwidth (at least
    TBF_MIN_BURST), so the burst is the same time at every rate: a transfer that outlasts it
    takes its bytes over the rate less TBF_BURST_S at any rate, a constant the what-if's
    bandwidth scaling keeps with the hosts' part of the time."""
    return max(int(rate_bytes_per_s(rate) * TBF_BURST_S), TBF_MIN_BURST)


@dataclass(frozen=True)
class NodeResult:
    """One node's torchrun agent: exit status and what it printed."""
    node: int
    returncode: int
    stdout: str
    stderr: str


def emulation_unavailable() -> str | None:
    """Why an emulated cluster cannot be built here (None when it can): not root, no `ip` or
    `tc`, network namespaces or tbf not permitted."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2)"
    probe = EmulatedCluster(nodes=1, rate="100mbit", name=f"dpkprobe{os.getpid() % 100000}")
    try:
        probe.up()
    except EmulationError as exc:
        return f"cannot build a namespace with a tbf-shaped veth: {exc}"
    finally:
        probe.down()
    return None


class EmulationError(RuntimeError):
    """A namespace, link or qdisc could not be made (the message holds the failing command)."""


class EmulatedCluster:
    """`nodes` network namespaces, node i at 10.77.0.(i+1)/24 on its `eth0`, all joined to a
    bridge that lives in a hub namespace; every link shaped to `rate` (tc syntax: "100mbit") in
    both directions. Use as a context manager (or up()/down()); down() kills the jobs it
    launched that still run and removes every namespace it made, and so does interpreter exit
    or SIGTERM (while up, a SIGTERM left at its default action raises SystemExit instead, so
    `with` blocks unwind)."""

    def __init__(self, nodes: int, rate: str = "100mbit", *, name: str | None = None) -> None:
        if nodes < 1:
            raise ValueError("an emulated cluster needs at least one node")
        self.nodes = nodes
        self.rate = rate
        self.name = name or f"dpk{os.getpid() % 100000}"
        self._made: list[str] = []
        self._jobs: list[subprocess.Popen] = []
        self._sigterm = None  # the SIGTERM handler up() replaced, restored by down()

    # -- namespaces and links ---------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.name}hub"

    def namespace(self, node: int) -> str:
        return f"{self.name}n{node}"

    @staticmethod
    def address(node: int) -> str:
        """Node `node`'s address on the emulated network."""
        return f"10.77.0.{node + 1}"

    def up(self) -> "EmulatedCluster":
        """Create the hub with its bridge, then each node with its shaped link."""
        atexit.register(self.down)
        self._exit_on_sigterm()
        try:
            self._namespace(self.hub)
            self._ip(self.hub, "link", "add", "br0", "type", "bridge")
            self._ip(self.hub, "link", "set", "br0", "up")
            for node in range(self.nodes):
                self._add_node(node)
        except BaseException:
            self.down()
            raise
        return self

    def _add_node(self, node: int) -> None:
        ns, port = self.namespace(node), f"v{node}"
        self._namespace(ns)
        _run(["ip", "link", "add", port, "netns", self.hub, "type", "veth", "peer", "name",
              "eth0", "netns", ns])
        self._ip(self.hub, "link", "set", port, "master", "br0", "up")
        self._ip(ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "link", "set", "lo", "up")
        self._shape("add", self.hub, port)   # towards the node
        self._shape("add", ns, "eth0")       # from the node

    def set_rate(self, rate: str) -> None:
        """Reshape every link to `rate` without rebuilding the cluster."""
        for node in range(self.nodes):
            self._shape("change", self.hub, f"v{node}", rate)
            self._shape("change", self.namespace(node), "eth0", rate)
        self.rate = rate

    def _shape(self, verb: str, ns: str, dev: str, rate: str | None = None) -> None:
        rate = rate or self.rate
        try:
            burst = tbf_burst_bytes(rate)
        except ValueError as exc:
            raise EmulationError(f"cannot shape {dev} with tbf: {exc}") from None
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", dev, "root", "tbf",
              "rate", rate, "burst", str(burst), "latency", TBF_LATENCY])

    def _namespace(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def down(self) -> None:
        """Kill the jobs launched here that still run, then delete every namespace this
        cluster made (their links and qdiscs go with them)."""
        while self._jobs:
            job = self._jobs.pop()
            if job.poll() is None:
                kill_node(job)
                job.wait()
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def _exit_on_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while the cluster is up (main thread, default action
        only), so that a terminated job still runs down()."""
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            self._sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)

    def __enter__(self) -> "EmulatedCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- jobs --------------------------------------------------------------------------------
    def launch(self, args: list[str], *, nproc_per_node: int = 1, env: dict | None = None,
               cwd: str | os.PathLike | None = None, rendezvous_id: str | None = None
               ) -> list[subprocess.Popen]:
        """Start `torchrun ... ARGS` with one agent per node (c10d rendezvous at node 0), each
        in its own session (kill_node reaches its workers); the agents' processes by node."""
        launcher = str(Path(sys.executable).parent / "torchrun")
        self._jobs = [job for job in self._jobs if job.poll() is None]
        jobs = [subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(node), launcher,
             "--nnodes", str(self.nodes), "--nproc_per_node", str(nproc_per_node),
             "--rdzv_backend", "c10d", "--rdzv_endpoint",
             f"{self.address(0)}:{RENDEZVOUS_PORT}", "--rdzv_id", rendezvous_id or self.name,
             "--rdzv_conf", f"is_host={int(node == 0)}", "--local-addr", self.address(node),
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
            start_new_session=True,
            env={**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": "eth0"})
            for node in range(self.nodes)]
        self._jobs.extend(jobs)
        return jobs

    def torchrun(self, args: list[str], *, nproc_per_node: int = 1, env: dict | None = None,
                 timeout_s: float = 600.0, cwd: str | os.PathLike | None = None
                 ) -> list[NodeResult]:
        """launch() and wait for every node; each node's exit status and output. On timeout
        every agent and its workers are killed."""
        procs = self.launch(args, nproc_per_node=nproc_per_node, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout_s
        results = []
        for node, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                for p in procs:
                    kill_node(p)
                out, err = proc.communicate()
                err += f"\nemulation: killed after {timeout_s:.0f} s"
            results.append(NodeResult(node, proc.returncode, out, err))
        return results


def _raise_system_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node's torchrun agent and its workers (its whole session)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise EmulationError(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")
