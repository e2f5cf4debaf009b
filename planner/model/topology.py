"""A cluster's topology as a graph, and the per-hop collective costs it implies.

The cluster file (dpkfac.core.cluster) becomes a networkx graph: GPUs, one NIC per node, one
fabric switch. The bottleneck link and the slowest hop of the ring through all ranks set the
per-hop cost of the collectives (planner.model.network.Network). Bandwidths in bytes per second,
latencies in seconds, memory in bytes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import networkx as nx

from dpkfac.core.cluster import Cluster
from dpkfac.core.errors import InputError
from dpkfac.core.profile import AlphaBeta, CommCosts, MeasuredPoints
from planner.model.network import Network


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


def cluster_network(cluster: Cluster, hosts: CommCosts | None = None) -> Network | None:
    """Per-hop collective costs of the cluster (None for a flat cluster: use the profile's).

    A pipelined broadcast and a ring all-reduce move every byte over every hop of the ring in
    rank order, so the slowest hop sets the pace: alpha' = the largest hop latency,
    beta' = 1 / the smallest bottleneck bandwidth of any hop.

    hosts: a profile's measured collectives. When they know the rate of the link they were
    measured on (`profile --link-rate`), the cluster's links take over only the wire: a
    measured call that waited for the wire is rescaled with that wait to the cluster's
    bottleneck bandwidth, one that did not keeps its time (latency floor, copies, the
    backend's own costs), as `whatif --bandwidth-scale` does (MeasuredPoints.faster_link);
    other rank counts follow the cluster's per-hop forms.
    Without a link rate the links alone price the collectives."""
    if cluster.intra_node is None:
        return None
    if cluster.workers == 1:
        hop = AlphaBeta(alpha_s=cluster.intra_node.latency_s,
                        beta_s_per_byte=1 / cluster.intra_node.bandwidth_bytes_per_s)
        return Network(broadcast_hop=hop, allreduce_hop=hop, source="cluster")
    hops = ring_hops(cluster_graph(cluster), ranks=range(cluster.workers))
    hop = AlphaBeta(alpha_s=max(h[0] for h in hops),
                    beta_s_per_byte=1 / min(h[1] for h in hops))
    links = Network(broadcast_hop=hop, allreduce_hop=hop, source="cluster")
    return links if hosts is None else on_profiled_hosts(links, hosts)


def on_profiled_hosts(links: Network, hosts: CommCosts) -> Network:
    """`links` (a cluster's per-hop costs) carrying `hosts`' measured curves (cluster_network);
    `links` unchanged when they lack points or a link rate."""
    if hosts.link_bytes_per_s is None or hosts.world_size < 2 or hosts.allreduce_points is None:
        return links
    scale = 1.0 / (links.allreduce_hop.beta_s_per_byte * hosts.link_bytes_per_s)

    def moved(points: MeasuredPoints | None, kind: str) -> MeasuredPoints | None:
        return None if points is None else points.faster_link(
            scale, wire_s_per_byte=hosts.wire_s_per_byte(kind))
    return replace(links,
                   measured_ranks=hosts.world_size,
                   allreduce_points=moved(hosts.allreduce_points, "allreduce"),
                   broadcast_points=moved(hosts.broadcast_points, "broadcast"),
                   broadcast_overlap=hosts.broadcast_overlap)


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


