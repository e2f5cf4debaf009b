"""Cluster files: validation, topology -> collective costs, heterogeneous and capped planning."""
from __future__ import annotations

import json

import pytest

from dpkfac.core.cluster import cluster_from_dict, load_cluster
from planner.model.topology import cluster_graph, cluster_network, state_caps
from planner.model.costs import PlanConfig
from dpkfac.core.errors import InputError
from planner.plan import make_plan
from dpkfac.core.profile import profile_from_dict
from dpkfac.core.units import TCP_REVERSE_ACK_SHARE

from planner_fixtures import synthetic_profile_dict

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def cluster_doc(**changes) -> dict:
    doc = {"schema": "dpkfac.cluster/1", "nodes": 2, "gpus_per_node": 2,
           "intra_node": {"bandwidth_bytes_per_s": 1e11, "latency_s": 2e-6},
           "inter_node": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5},
           "worker": {"speed": 1.0, "memory_bytes": "1GiB"},
           "workers": [{"rank": 3, "speed": 0.5, "memory_bytes": 1000000}]}
    doc.update(changes)
    return doc


def test_example_cluster_file_loads():
    cluster = load_cluster(ROOT / "examples" / "cluster-16x4-ib100.json")
    assert cluster.workers == 64 and cluster.nodes == 16
    assert cluster.speeds[60] == 0.5 and cluster.memory_bytes[62] == 8 * 2 ** 30
    net = cluster_network(cluster)
    assert net.broadcast_hop.beta_s_per_byte == pytest.approx(1 / 1.25e10)
    assert net.broadcast_hop.alpha_s == pytest.approx(8e-6)


def test_graph_and_bottleneck_by_hand():
    cluster = cluster_from_dict(cluster_doc())
    graph = cluster_graph(cluster)
    assert graph.has_edge(("gpu", 0), ("gpu", 1)) and not graph.has_edge(("gpu", 1), ("gpu", 2))
    net = cluster_network(cluster)
    # the ring 0-1-2-3-0 crosses nodes: the slowest hop is the inter-node path
    assert net.allreduce_hop.alpha_s == pytest.approx(1e-5)
    assert net.allreduce_hop.beta_s_per_byte == pytest.approx(1e-10)
    assert net.broadcast_s(ranks=4, nbytes=1e6) == pytest.approx(3 * 1e-5 + 1e6 * 1e-10)
    one_node = cluster_from_dict(cluster_doc(nodes=1, gpus_per_node=4))
    assert cluster_network(one_node).broadcast_hop.beta_s_per_byte == pytest.approx(1e-11)


def test_state_caps_leave_room_for_broadcast_buffers():
    cluster = cluster_from_dict(cluster_doc())
    caps = state_caps(cluster, common_bytes=1000)
    assert caps == (2 ** 30 - 1000,) * 3 + (1000000 - 1000,)
    assert state_caps(cluster, common_bytes=1000, memory_cap=5000) == (5000,) * 4
    with pytest.raises(InputError, match="worker 3 has 1000000 bytes"):
        state_caps(cluster, common_bytes=2000000)


BAD = {
    "schema": ({"schema": "dpkfac.cluster/9"}, r"field schema.*dpkfac\.cluster/1"),
    "nodes": ({"nodes": 0}, r"field nodes.*minimum|field nodes.*less than"),
    "type": ({"gpus_per_node": "four"}, r"field gpus_per_node.*integer"),
    "link": ({"intra_node": {"bandwidth_bytes_per_s": 1e9}}, r"field intra_node.*latency_s"),
    "bandwidth": ({"inter_node": {"bandwidth_bytes_per_s": 0, "latency_s": 1e-6}},
                  r"field inter_node/bandwidth_bytes_per_s"),
    "rank": ({"workers": [{"rank": 4, "speed": 1.0}]}, r"field workers/0/rank.*out of range"),
    "twice": ({"workers": [{"rank": 1}, {"rank": 1}]}, r"field workers/1/rank.*twice"),
    "memory": ({"worker": {"memory_bytes": "lots"}}, r"field worker/memory_bytes"),
    "unit": ({"worker": {"memory_bytes": "3 parsecs"}}, r"worker/memory_bytes.*byte size"),
    "extra": ({"gpus": 4}, r"gpus"),
    "inter": ({"inter_node": None}, r"inter_node"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_cluster_files_name_file_and_field(tmp_path, case):
    changes, pattern = BAD[case]
    doc = cluster_doc(**changes)
    if doc.get("inter_node") is None:
        del doc["inter_node"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=pattern) as info:
        load_cluster(path)
    assert "c.json" in str(info.value)


def test_plan_on_a_heterogeneous_capped_cluster():
    doc = synthetic_profile_dict(12, 5)
    profile = profile_from_dict(doc)
    cluster = cluster_from_dict(cluster_doc(worker={"speed": 1.0}, workers=[
        {"rank": 0, "speed": 0.25}, {"rank": 1, "speed": 2.0}]))
    plan = make_plan(profile=profile, cluster=cluster, config=PlanConfig(), time_limit_s=2)
    loads = plan.prediction.compute_s
    # the fast worker carries the most, the slow one the least work at speed 1
    work = [sum(l.factor_s + l.decompose_s + l.precondition_s
                for l, o in zip(profile.layers, plan.solution.owners) if o == w)
            for w in range(4)]
    assert work[1] == max(work) and work[0] == min(work)
    if plan.split:  # shared preconditioning takes work off the busiest owners
        assert max(loads) < plan.solution.makespan_s
    else:
        assert max(loads) == pytest.approx(plan.solution.makespan_s)
    cap = max(l.state_bytes for l in profile.layers) * 3
    capped = make_plan(profile=profile, cluster=cluster, config=PlanConfig(), memory_cap=cap,
                       time_limit_s=2)
    assert max(capped.prediction.state_bytes) <= cap
    assert capped.network is not None and capped.network.source == "cluster"


def _measured_on_a_link(link_bytes_per_s: float | None) -> dict:
    """A 2-rank profile whose collectives were measured on a link of that rate: 1 ms latency
    floor, 2 ms of hosts' work at the largest size, the rest wire time."""
    doc = synthetic_profile_dict(4, 0, world_size=2)
    sizes = [1024, 65536, 1 << 20]
    doc["comm"]["message_bytes"] = sizes
    for kind, per_byte in (("allreduce", 1 + TCP_REVERSE_ACK_SHARE), ("broadcast", 1.0)):
        # what a 10 MB/s link takes per byte at 2 ranks (an all-reduce's carries ACKs too)
        doc["comm"][kind]["seconds"] = [1e-3 + n * per_byte / 1e7 + 2e-3 * n / sizes[-1]
                                        for n in sizes]
    if link_bytes_per_s is not None:
        doc["comm"]["link_bytes_per_s"] = link_bytes_per_s
    return doc


def _two_nodes(bandwidth: float) -> dict:
    return {"schema": "dpkfac.cluster/1", "nodes": 2, "gpus_per_node": 1,
            "intra_node": {"bandwidth_bytes_per_s": 1e11, "latency_s": 1e-6},
            "inter_node": {"bandwidth_bytes_per_s": bandwidth, "latency_s": 1e-4}}


def test_a_cluster_file_moves_only_the_wire_of_profiled_collectives():
    """The cluster's links replace the profiled link's: the same links give the profile's own
    collectives, 4x faster links its --bandwidth-scale 4."""
    from planner.model.costs import network_of
    from planner.whatif.sweep import scale_bandwidth

    profile = profile_from_dict(_measured_on_a_link(1e7))
    for bandwidth, expected in ((1e7, profile), (4e7, scale_bandwidth(profile, 4.0))):
        net = cluster_network(cluster_from_dict(_two_nodes(bandwidth)), hosts=profile.comm)
        want = network_of(expected)
        assert net.source == "cluster"
        for n in (1024, 65536, 500_000, 1 << 20):
            assert net.allreduce_s(ranks=2, nbytes=n) == pytest.approx(want.allreduce_s(ranks=2, nbytes=n))
            assert net.broadcast_s(ranks=2, nbytes=n) == pytest.approx(want.broadcast_s(ranks=2, nbytes=n))
    # a call that waited for the wire shrinks with its wait: 4x the bandwidth, a quarter
    slow = cluster_network(cluster_from_dict(_two_nodes(1e7)), hosts=profile.comm)
    fast = cluster_network(cluster_from_dict(_two_nodes(4e7)), hosts=profile.comm)
    n = 1 << 20
    for kind in ("allreduce_s", "broadcast_s"):
        assert getattr(fast, kind)(ranks=2, nbytes=n) == \
            pytest.approx(getattr(slow, kind)(ranks=2, nbytes=n) / 4)
    # a profile that cannot tell its link from its hosts: the links alone
    blind = profile_from_dict(_measured_on_a_link(None))
    links = cluster_network(cluster_from_dict(_two_nodes(1e7)), hosts=blind.comm)
    assert links == cluster_network(cluster_from_dict(_two_nodes(1e7)))
    assert links.allreduce_points is None
