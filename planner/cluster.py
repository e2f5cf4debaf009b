"""The cluster description: `--workers N` (a flat cluster of identical workers) or a JSON file
(schema dpkfac.cluster/1): nodes x GPUs per node, intra- and inter-node links, per-worker speed
and memory. The file becomes a networkx graph (GPUs, one NIC per node, one fabric switch); the
bottleneck link and the slowest hop of the ring through all ranks set the per-hop cost of the
collectives (planner.comm.Network). Bandwidths in bytes per second, latencies in seconds,
memory in bytes (or a string with a unit, e.g. "80GiB").

Example:
    {"schema": "dpkfac.cluster/1", "nodes": 16, "gpus_per_node": 4,
     "intra_node": {"bandwidth_bytes_per_s": 2.0e11, "latency_s": 3e-6},
     "inter_node": {"bandwidth_bytes_per_s": 1.25e10, "latency_s": 8e-6},
     "worker": {"speed": 1.0, "memory_bytes": "16GiB"},
     "workers": [{"rank": 5, "speed": 0.7}]}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import networkx as nx

from .comm import Network
from .errors import InputError
from .jsonio import read_json, validate
from .profile import AlphaBeta
from .units import parse_bytes

CLUSTER_SCHEMA_ID = "dpkfac.cluster/1"

_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_MEMORY = {"oneOf": [{"type": "integer", "minimum": 0},
                     {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[a-zA-Z]*\s*$"}]}
_LINK = {"type": "object", "required": ["bandwidth_bytes_per_s", "latency_s"],
         "additionalProperties": False,
         "properties": {"bandwidth_bytes_per_s": _POSITIVE,
                        "latency_s": {"type": "number", "minimum": 0}}}
_WORKER = {"type": "object", "additionalProperties": False,
           "properties": {"speed": _POSITIVE, "memory_bytes": _MEMORY}}

CLUSTER_SCHEMA: dict = {
    "type": "object",
    "required": ["schema", "nodes", "gpus_per_node", "intra_node"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": CLUSTER_SCHEMA_ID},
        "name": {"type": "string"},
        "nodes": {"type": "integer", "minimum": 1},
        "gpus_per_node": {"type": "integer", "minimum": 1},
        "intra_node": _LINK,
        "inter_node": _LINK,
        "worker": _WORKER,
        "workers": {"type": "array", "items": {
            "type": "object", "required": ["rank"], "additionalProperties": False,
            "properties": {"rank": {"type": "integer", "minimum": 0}, "speed": _POSITIVE,
                           "memory_bytes": _MEMORY}}},
    },
}


@dataclass(frozen=True)
class Link:
    """A link: bandwidth in bytes per second, latency in seconds."""
    bandwidth_bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    """Workers (ranks, node-major: rank r on node r // gpus_per_node), their relative speeds and
    memory (bytes, None: unknown), and the links between them (None for a flat cluster whose
    collectives come from the profile)."""
    workers: int
    gpus_per_node: int
    speeds: tuple[float, ...]
    memory_bytes: tuple[int | None, ...]
    intra_node: Link | None = None
    inter_node: Link | None = None
    source: str = "--workers"

    @property
    def nodes(self) -> int:
        """Number of nodes."""
        return -(-self.workers // self.gpus_per_node)

    def node_of(self, rank: int) -> int:
        """The node that rank `rank` sits on."""
        return rank // self.gpus_per_node


def flat_cluster(*, workers: int, speeds: Sequence[float] | None = None) -> Cluster:
    """`--workers N`: one node of N workers, network from the profile."""
    return Cluster(workers=workers, gpus_per_node=workers,
                   speeds=tuple(speeds) if speeds is not None else (1.0,) * workers,
                   memory_bytes=(None,) * workers)


def cluster_from_dict(doc: Any, *, source: str = "cluster") -> Cluster:
    """Validate a parsed cluster document and build a Cluster; InputError naming the field."""
    if isinstance(doc, dict) and doc.get("schema") not in (None, CLUSTER_SCHEMA_ID):
        raise InputError(f"{source}: field schema: expected {CLUSTER_SCHEMA_ID!r}, "
                         f"got {doc.get('schema')!r}")
    validate(doc, CLUSTER_SCHEMA, source=source)
    nodes, per_node = doc["nodes"], doc["gpus_per_node"]
    workers = nodes * per_node
    if nodes > 1 and "inter_node" not in doc:
        raise InputError(f"{source}: field inter_node: required when nodes > 1 "
                         f"(bandwidth_bytes_per_s and latency_s of the links between nodes)")
    default = doc.get("worker", {})
    speeds = [float(default.get("speed", 1.0))] * workers
    memory = [_memory(default, f"{source}: field worker/memory_bytes")] * workers
    seen: set[int] = set()
    for i, entry in enumerate(doc.get("workers", [])):
        rank = entry["rank"]
        if rank >= workers:
            raise InputError(f"{source}: field workers/{i}/rank: rank {rank} is out of range "
                             f"for {nodes} nodes x {per_node} GPUs (expected 0..{workers - 1})")
        if rank in seen:
            raise InputError(f"{source}: field workers/{i}/rank: rank {rank} appears twice")
        seen.add(rank)
        if "speed" in entry:
            speeds[rank] = float(entry["speed"])
        if "memory_bytes" in entry:
            memory[rank] = _memory(entry, f"{source}: field workers/{i}/memory_bytes")
    inter = doc.get("inter_node")
    return Cluster(workers=workers, gpus_per_node=per_node, speeds=tuple(speeds),
                   memory_bytes=tuple(memory), intra_node=Link(**doc["intra_node"]),
                   inter_node=Link(**inter) if inter else None, source=source)


def load_cluster(path: str | os.PathLike) -> Cluster:
    """Read and validate a cluster file."""
    where = f"cluster {str(path)!r}"
    return cluster_from_dict(read_json(path, what="cluster"), source=where)


def cluster_graph(cluster: Cluster) -> nx.Graph:
    """The topology as a graph: ("gpu", r) nodes, ("nic", n) per node, "fabric" between nodes.

    Edge attributes: bandwidth (bytes/s) and latency (s). GPUs of one node are fully connected by
    intra-node links; each GPU reaches its node's NIC over an intra-node link (no latency of its
    own); each NIC reaches the fabric over the inter-node link (half its latency each way)."""
    if cluster.intra_node is None:
        raise ValueError("a flat cluster has no topology")
    graph = nx.Graph()
    intra, inter = cluster.intra_node, cluster.inter_node
    for node in range(cluster.nodes):
        ranks = [r for r in range(cluster.workers) if cluster.node_of(r) == node]
        for i, a in enumerate(ranks):
            graph.add_node(("gpu", a), node=node)
            for b in ranks[i + 1:]:
                graph.add_edge(("gpu", a), ("gpu", b), bandwidth=intra.bandwidth_bytes_per_s,
                               latency=intra.latency_s)
            if inter is not None and cluster.nodes > 1:
                graph.add_edge(("gpu", a), ("nic", node), bandwidth=intra.bandwidth_bytes_per_s,
                               latency=0.0)
        if inter is not None and cluster.nodes > 1:
            graph.add_edge(("nic", node), "fabric", bandwidth=inter.bandwidth_bytes_per_s,
                           latency=inter.latency_s / 2)
    return graph


def ring_hops(graph: nx.Graph, *, ranks: Sequence[int]) -> list[tuple[float, float]]:
    """(latency s, bottleneck bandwidth bytes/s) of each hop of the ring through `ranks` in order,
    along the lowest-latency path of the graph. Every node is alike in this format, so the path
    is computed once for a hop inside a node and once for a hop between nodes."""
    hops, cache = [], {}
    for a, b in zip(ranks, list(ranks[1:]) + list(ranks[:1])):
        if a == b:
            continue
        key = (graph.nodes[("gpu", a)]["node"] == graph.nodes[("gpu", b)]["node"],)
        if key not in cache:
            path = nx.shortest_path(graph, ("gpu", a), ("gpu", b), weight="latency")
            edges = [graph.edges[u, v] for u, v in zip(path, path[1:])]
            cache[key] = (sum(e["latency"] for e in edges), min(e["bandwidth"] for e in edges))
        hops.append(cache[key])
    return hops


def cluster_network(cluster: Cluster) -> Network | None:
    """Per-hop collective costs of the cluster (None for a flat cluster: use the profile's).

    A pipelined broadcast and a ring all-reduce move every byte over every hop of the ring in
    rank order, so the slowest hop sets the pace: alpha' = the largest hop latency,
    beta' = 1 / the smallest bottleneck bandwidth of any hop."""
    if cluster.intra_node is None:
        return None
    if cluster.workers == 1:
        hop = AlphaBeta(alpha_s=cluster.intra_node.latency_s,
                        beta_s_per_byte=1 / cluster.intra_node.bandwidth_bytes_per_s)
        return Network(broadcast_hop=hop, allreduce_hop=hop, source="cluster")
    hops = ring_hops(cluster_graph(cluster), ranks=range(cluster.workers))
    hop = AlphaBeta(alpha_s=max(h[0] for h in hops),
                    beta_s_per_byte=1 / min(h[1] for h in hops))
    return Network(broadcast_hop=hop, allreduce_hop=hop, source="cluster")


def state_caps(cluster: Cluster, *, common_bytes: int,
               memory_cap: int | None = None) -> tuple[int, ...] | None:
    """Bytes of second-order state each worker may hold: its memory less the `common_bytes`
    every worker needs (broadcast buffers), and at most `memory_cap`. None when neither limits.
    InputError when a worker's memory cannot even hold the common bytes."""
    if memory_cap is None and all(m is None for m in cluster.memory_bytes):
        return None
    caps = []
    for rank, mem in enumerate(cluster.memory_bytes):
        cap = memory_cap if memory_cap is not None else None
        if mem is not None:
            if mem < common_bytes:
                raise InputError(f"{cluster.source}: worker {rank} has {mem} bytes of memory, "
                                 f"less than the {common_bytes} bytes of broadcast buffers every "
                                 f"worker holds")
            cap = mem - common_bytes if cap is None else min(cap, mem - common_bytes)
        caps.append(cap if cap is not None else 2 ** 62)
    return tuple(caps)


def _memory(entry: dict, where: str) -> int | None:
    value = entry.get("memory_bytes")
    if value is None or isinstance(value, int):
        return value
    return parse_bytes(value, what=where)
