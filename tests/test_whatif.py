"""`dpkfac whatif` sweeps: traffic by kind, monotonic sanity, knees, topology, plot, speed."""
from __future__ import annotations

import copy
import dataclasses
import csv
import io
import json
import time
from pathlib import Path

import pytest

from dpkfac.core.step import TRAFFIC_KINDS
from dpkfac.core.units import TCP_REVERSE_ACK_SHARE
from planner.model.costs import traffic_by_kind
from planner.whatif.baselines import ALGORITHMS, algorithm_cost
from dpkfac.core.cluster import Link
from planner.model.costs import PlanConfig
from dpkfac.core.errors import InputError
from dpkfac.core.profile import load_profile, profile_from_dict
from dpkfac.core.strategy import DP_KFAC, KAISA_COMM_OPT, MPD_KFAC
from planner.whatif.sweep import (Sweep, Topology, expand_workers, knees, scaling_knee, sweep_rows)

from planner_fixtures import run_planner_cli, synthetic_profile_dict, write_profile

ROOT = Path(__file__).resolve().parents[1]
RESNET50 = ROOT / "profiles" / "resnet50.b32.analytic-16x4-ib100.json"


run = run_planner_cli


@pytest.fixture
def profile_path(tmp_path) -> Path:
    return write_profile(tmp_path, n_layers=10, seed=3)


def two_layers() -> dict:
    """A (dim_a 10, dim_g 20) and B (dim_a 30, dim_g 5) layer; 4-byte floats."""
    doc = synthetic_profile_dict(2, 0)
    for layer, (a, g) in zip(doc["layers"], [(10, 20), (30, 5)]):
        layer.update(dim_a=a, dim_g=g, grad_numel=a * g)
    return doc


def test_traffic_by_kind_hand_counts():
    profile = profile_from_dict(two_layers())
    grads = 4 * (200 + 150)                       # both layers' dW
    factors = 4 * (100 + 400 + 900 + 25)          # A and G of both
    eigen = 4 * (110 + 420 + 930 + 30)            # Q (d^2) and d (d) of both
    ring = lambda n: 4 * 3 / 4 * n  # noqa: E731  (4 workers: 4 (p-1)/p n)
    config = PlanConfig(factor_update_freq=2, inv_update_freq=5)
    kinds = traffic_by_kind(profile, strategy=None, owners=(), workers=4, config=config)
    assert kinds["gradient_allreduce"] == ring(grads + 4)  # + the loss in the same buffer
    dp = traffic_by_kind(profile, strategy=DP_KFAC, owners=(0, 3), workers=4, config=config)
    assert dp == {**kinds, "preconditioned_gradient_broadcast": grads, "numerics_counters": 32}
    mpd = traffic_by_kind(profile, strategy=MPD_KFAC, owners=(1, 1), workers=4, config=config)
    assert mpd == {**dp, "factor_allreduce": ring(factors) / 2, "numerics_counters": 16}
    comm_opt = traffic_by_kind(profile, strategy=KAISA_COMM_OPT, owners=(0, 1), workers=4,
                               config=config)
    assert comm_opt == {**kinds, "factor_allreduce": ring(factors) / 2,
                        "decomposition_broadcast": eigen / 5, "numerics_counters": 32 / 5}
    assert set(traffic_by_kind(profile, strategy=DP_KFAC, owners=(0, 0), workers=1,
                               config=config).values()) == {0}


def test_rows_carry_contract_keys_breakdown_and_settings():
    profile = profile_from_dict(synthetic_profile_dict(8, 1))
    rows = sweep_rows(profile, Sweep(workers=(1, 4), batch_sizes=(16, 64),
                                     bandwidth_scales=(1.0, 2.0)))
    assert len(rows) == 2 * 2 * 2 * len(ALGORITHMS)
    for row in rows:
        kinds = sum(row[f"comm_{k}_bytes"] for k in TRAFFIC_KINDS)
        assert row["comm_bytes_per_step"] == round(kinds)
        assert row["memory_bytes_per_worker"] >= row["second_order_memory_bytes"]
    # bigger batch: more factor work, so MPD-KFAC's replicated factors cost more
    mpd = {(r["batch_size"], r["bandwidth_scale"]): r for r in rows
           if r["algorithm"] == "mpd-kfac" and r["workers"] == 4}
    assert mpd[(64, 1.0)]["second_order_s"] > mpd[(16, 1.0)]["second_order_s"]


@pytest.mark.parametrize("seed", range(3))
def test_more_bandwidth_is_never_slower(seed):
    profile = profile_from_dict(synthetic_profile_dict(12, seed, world_size=[1, 2, 8][seed]))
    topology = Topology(gpus_per_node=4, intra_node=Link(1e11, 3e-6), inter_node=Link(1e10, 8e-6))
    for topo in (None, topology):
        rows = sweep_rows(profile, Sweep(workers=(1, 2, 3, 8, 32), topology=topo,
                                         bandwidth_scales=(0.25, 1.0, 4.0, 16.0),
                                         inv_update_freqs=(1, 3)))
        by_point: dict = {}
        for r in rows:
            by_point.setdefault((r["workers"], r["algorithm"], r["inv_update_freq"]),
                                []).append(r)
        for point, series in by_point.items():
            times = [r["step_time_s"] for r in sorted(series, key=lambda r: r["bandwidth_scale"])]
            assert all(b <= a * (1 + 1e-12) for a, b in zip(times, times[1:])), point


def test_owners_found_at_one_bandwidth_serve_the_others(monkeypatch):
    """The planner searches under a time budget; a poor search at one scale is replaced by
    the owners found at another when they predict a shorter step there."""
    import planner.whatif.sweep as sweep_module

    profile = profile_from_dict(synthetic_profile_dict(6, 0, world_size=2))
    sweep = Sweep(workers=(2,), bandwidth_scales=(1.0, 4.0), algorithms=("dp-kfac",))
    poor, good = (0,) * 6, (0, 1) * 3

    def rows_with(owners_at_4x):
        def owners_of(point_profile, *, algorithm, workers, config, network):
            slow = point_profile.comm.allreduce == profile.comm.allreduce
            return good if slow else owners_at_4x
        monkeypatch.setattr(sweep_module, "default_owners", owners_of)
        return sweep_rows(profile, sweep)

    searched_well, searched_poorly = rows_with(good), rows_with(poor)
    assert searched_poorly[1]["step_time_s"] == searched_well[1]["step_time_s"]
    assert searched_poorly[1]["step_time_s"] <= searched_poorly[0]["step_time_s"]
    only_poor = dataclasses.replace(sweep, bandwidth_scales=(4.0,))
    monkeypatch.setattr(sweep_module, "default_owners", lambda *a, **k: poor)
    assert sweep_rows(profile, only_poor)[0]["step_time_s"] > searched_well[1]["step_time_s"]


def test_slower_inter_node_links_are_slower_across_nodes():
    profile = profile_from_dict(synthetic_profile_dict(12, 2))
    fast = Topology(gpus_per_node=4, intra_node=Link(1e11, 3e-6), inter_node=Link(1e11, 3e-6))
    slow = Topology(gpus_per_node=4, intra_node=Link(1e11, 3e-6), inter_node=Link(1e9, 3e-5))
    rows = {name: sweep_rows(profile, Sweep(workers=(4, 16), topology=topo))
            for name, topo in (("fast", fast), ("slow", slow))}
    for a, b in zip(rows["fast"], rows["slow"]):
        if a["workers"] == 4:  # one node: the inter-node link is not used
            assert a["step_time_s"] == b["step_time_s"]
        elif a["algorithm"] != "sgd" or a["workers"] > 1:
            assert b["step_time_s"] > a["step_time_s"], a["algorithm"]


def test_scaling_knee():
    rows = [{"workers": p, "step_time_s": t} for p, t in
            [(1, 1.0), (2, 1.0), (4, 1.1), (8, 2.0), (16, 4.5)]]
    assert scaling_knee(rows) == 4            # 4 -> 8 gains 10% of an ideal 100%
    assert scaling_knee(rows[:3]) is None     # every step pays
    assert scaling_knee([{"workers": 1, "step_time_s": 1.0},
                         {"workers": 2, "step_time_s": 3.0}]) == 1


def test_expand_workers():
    assert expand_workers("1..4096") == tuple(2 ** k for k in range(13))
    assert expand_workers("3,6..24,6") == (3, 6, 12, 24)
    for bad in ("8..2", "0..4", "1..x", ""):
        with pytest.raises(InputError):
            expand_workers(bad)


def test_sweep_1_to_4096_workers_all_algorithms_is_fast():
    profile = load_profile(RESNET50)
    start = time.perf_counter()
    rows = sweep_rows(profile, Sweep(workers=expand_workers("1..4096")))
    assert time.perf_counter() - start < 5.0
    assert len(rows) == 13 * len(ALGORITHMS)
    at64 = {r["algorithm"]: r for r in rows if r["workers"] == 64}
    assert at64["mpd-kfac"]["comm_bytes_per_step"] >= 2.79 * at64["dp-kfac"]["comm_bytes_per_step"]
    assert (at64["mpd-kfac"]["memory_bytes_per_worker"]
            >= 1.14 * at64["dp-kfac"]["memory_bytes_per_worker"])
    assert set(knees([r for r in rows if r["bandwidth_scale"] == 1.0])) == set(ALGORITHMS)


def test_cli_table_csv_json_and_plot(profile_path, tmp_path, capsys):
    plot = tmp_path / "whatif.png"
    assert run(["whatif", "--profile", str(profile_path), "--workers", "1..16",
                "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "Scaling knee" in out and "dp-kfac" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert run(["whatif", "--profile", str(profile_path), "--workers", "2,4", "--format", "csv",
                "--bandwidth-scale", "1,2", "--inv-update-freq", "1,10"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 2 * 2 * 2 * len(ALGORITHMS)
    assert {"workers", "algorithm", "step_time_s", "comm_bytes_per_step",
            "comm_factor_allreduce_bytes", "bandwidth_scale"} <= set(table[0])
    assert run(["whatif", "--profile", str(profile_path), "--workers", "1,2,8", "--format",
                "json", "--cluster", str(ROOT / "examples" / "cluster-16x4-ib100.json")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "dpkfac.whatif/1" and len(doc["rows"]) == 3 * len(ALGORITHMS)
    assert doc["rows"][0]["gpus_per_node"] == 4
    assert set(doc["knees"][0]["workers_by_algorithm"]) == set(ALGORITHMS)


@pytest.mark.parametrize("argv", [["--workers", "4..2"], ["--workers", "2", "--bandwidth-scale",
                                                          "0"],
                                  ["--workers", "2", "--batch-sizes", "0"],
                                  ["--workers", "2", "--plot", "{dir}/no/w.png"],
                                  ["--workers", "2", "--cluster", "{dir}/missing.json"]])
def test_bad_whatif_flags_exit_2(argv, profile_path, tmp_path, capsys):
    before = set(tmp_path.iterdir())
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    assert run(["whatif", "--profile", str(profile_path), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert set(tmp_path.iterdir()) == before


def test_dp_kfac_prediction_matches_the_planners_simulation():
    from planner.model.simulate import simulate_cycle

    doc = copy.deepcopy(synthetic_profile_dict(9, 5))
    profile = profile_from_dict(doc)
    owners = [i % 3 for i in range(9)]
    config = PlanConfig(factor_update_freq=2, inv_update_freq=4)
    cost = algorithm_cost(profile, algorithm="dp-kfac", workers=3, config=config, owners=owners)
    cycle = simulate_cycle(profile, owners=owners, workers=3, config=config)
    assert cost.step_time_s == cycle.mean_step_time_s


def test_bandwidth_scale_keeps_the_measured_curve_and_its_latency_floor():
    """Scaling the bandwidth divides what a measured collective takes beyond its smallest
    message's time, and keeps that floor (latency no bandwidth removes)."""
    import dataclasses

    from dpkfac.core.profile import MeasuredPoints
    from planner.whatif.sweep import scale_bandwidth

    points = MeasuredPoints((1024, 65536, 1 << 20), (0.003, 0.004, 0.091))
    profile = load_profile(ROOT / "profiles" / "digits-cnn.b32.cpu2-gloo.json")
    profile = dataclasses.replace(profile, comm=dataclasses.replace(
        profile.comm, allreduce_points=points, broadcast_points=points))
    faster = scale_bandwidth(profile, 4.0).comm.allreduce_points
    assert faster.message_bytes == points.message_bytes
    assert faster.seconds == pytest.approx((0.003, 0.00325, 0.003 + 0.088 / 4))


def test_bandwidth_scaling_with_a_known_link_rate_shrinks_a_waiting_call_with_its_wait():
    """100 Mbit/s links at 2 ranks: an all-reduce of n bytes spends n / 12.5 MB/s on the wire.
    A call that waited for it shrinks with that wait at 4x the bandwidth, the 13 ms it took
    beyond the wire too (the transfer's ramp and queue on the slow link; its latency ran under
    the transfer); without the rate, only what is above the floor shrinks."""
    from dpkfac.core.profile import CommCosts, MeasuredPoints
    from planner.whatif.sweep import scale_bandwidth

    sizes, wire = (1024, 1_000_000), 1_000_000 / 12.5e6
    points = MeasuredPoints(sizes, (0.003, 0.003 + 0.010 + wire))  # floor, 10 ms more, wire
    base = profile_from_dict(synthetic_profile_dict(2, 0, world_size=2))
    for rate, want in ((12.5e6, (0.013 + wire) / 4), (None, 0.003 + (0.010 + wire) / 4)):
        comm = CommCosts(backend="gloo", world_size=2, allreduce=base.comm.allreduce,
                         broadcast=base.comm.broadcast, allreduce_points=points,
                         broadcast_points=points, link_bytes_per_s=rate)
        faster = scale_bandwidth(dataclasses.replace(base, comm=comm), 4.0).comm
        assert faster.broadcast_points.seconds[1] == pytest.approx(want)  # p - 1 = 1 send
        assert faster.allreduce_points.seconds[1] == pytest.approx(want)  # ACKs: same ratio
        assert faster.allreduce_points.seconds[0] == pytest.approx(0.003)


def test_bandwidth_scaling_keeps_a_shaped_links_burst_in_seconds():
    """A token bucket of 5 ms of the rate lets that much of a message leave at once: at 100
    Mbit/s (12.5 MB/s) a 1 MB message waits 80 - 5 ms for the wire, at 4x 20 - 5 ms; a 150 KB
    one waits 12 - 5 ms, and nothing at 4x (it fits in the bucket: the floor is left). Each
    waiting call shrinks with its wait, the 5 ms it took beyond it too."""
    from dpkfac.core.profile import CommCosts, MeasuredPoints, profile_to_dict
    from planner.whatif.sweep import scale_bandwidth

    base = profile_from_dict(synthetic_profile_dict(2, 0, world_size=2))
    sizes, floor, host, burst = (1024, 150_000, 1_000_000), 0.003, 0.002, 0.005
    points = MeasuredPoints(sizes, (floor, floor + host + 0.012 - burst,
                                    floor + host + 0.080 - burst))
    comm = CommCosts(backend="gloo", world_size=2, allreduce=base.comm.allreduce,
                     broadcast=base.comm.broadcast, allreduce_points=points,
                     broadcast_points=points, link_bytes_per_s=12.5e6, link_burst_s=burst)
    profile = dataclasses.replace(base, comm=comm)
    faster = scale_bandwidth(profile, 4.0).comm
    big = floor + host + 0.080 - burst
    want = (floor, floor, big * (0.020 - burst) / (0.080 - burst))
    assert faster.broadcast_points.seconds == pytest.approx(want)
    ack = 1 + TCP_REVERSE_ACK_SHARE  # the all-reduce's link carries its ACKs too
    assert faster.allreduce_points.seconds[2] == pytest.approx(
        big * (0.020 * ack - burst) / (0.080 * ack - burst))
    assert faster.link_burst_s == burst  # the bucket fills at the faster rate too
    assert profile_from_dict(profile_to_dict(profile)).comm.link_burst_s == burst
    slower = scale_bandwidth(profile, 0.5).comm.broadcast_points.seconds
    assert slower[2] == pytest.approx(big * (0.160 - burst) / (0.080 - burst))


def test_bandwidth_scaling_counts_only_the_burst_that_refilled_before_the_profiles_calls():
    """The profile's calls follow 3 ms of compute after the call before drained the bucket:
    only 3 ms of the 5 ms burst left at once. At 100 Mbit/s (12.5 MB/s) a 600 KB message
    waited 48 - 3 ms for the wire, at 4x 12 - 3 ms; a 150 KB one 12 - 3 ms, at 4x nothing."""
    from dpkfac.core.profile import CommCosts, MeasuredPoints, profile_to_dict
    from planner.whatif.sweep import scale_bandwidth

    base = profile_from_dict(synthetic_profile_dict(2, 0, world_size=2))
    floor, host, idle = 0.003, 0.001, 0.003
    big = floor + host + 0.048 - idle
    points = MeasuredPoints((1024, 150_000, 600_000), (floor, floor + host + 0.012 - idle, big))
    comm = CommCosts(backend="gloo", world_size=2, allreduce=base.comm.allreduce,
                     broadcast=base.comm.broadcast, allreduce_points=points,
                     broadcast_points=points, link_bytes_per_s=12.5e6, link_burst_s=0.005,
                     link_idle_s=idle)
    profile = dataclasses.replace(base, comm=comm)
    assert comm.refilled_burst_s() == idle
    assert dataclasses.replace(comm, link_idle_s=0.02).refilled_burst_s() == 0.005
    faster = scale_bandwidth(profile, 4.0).comm
    assert faster.broadcast_points.seconds == pytest.approx((floor, floor, big * 9 / 45))
    assert profile_from_dict(profile_to_dict(profile)).comm.link_idle_s == idle
    # read as a full 5 ms bucket, the wait would have looked 2 ms shorter at both rates
    full = scale_bandwidth(dataclasses.replace(profile, comm=dataclasses.replace(
        comm, link_idle_s=None)), 4.0).comm
    assert full.broadcast_points.seconds[2] == pytest.approx(big * 7 / 43)


def test_an_allreduces_link_carries_the_acks_of_what_it_receives():
    """A ring all-reduce's ranks send and receive at once, so each link direction also carries
    the reverse stream's ACKs (a 66-byte frame per two 1514-byte ones); a broadcast's root
    only sends."""
    from dpkfac.core.profile import CommCosts

    base = profile_from_dict(synthetic_profile_dict(2, 0, world_size=3))
    comm = CommCosts(backend="gloo", world_size=3, allreduce=base.comm.allreduce,
                     broadcast=base.comm.broadcast, link_bytes_per_s=1e7)
    assert TCP_REVERSE_ACK_SHARE == pytest.approx(0.0218, abs=1e-4)
    assert comm.wire_s_per_byte("allreduce") == pytest.approx(4 / 3 * 1.0218 / 1e7, rel=1e-4)
    assert comm.wire_s_per_byte("broadcast") == pytest.approx(2 / 1e7)
    assert dataclasses.replace(comm, link_bytes_per_s=None).wire_s_per_byte("allreduce") is None


def test_bandwidth_scaling_of_a_call_whose_latency_ran_under_its_transfer():
    """A 1 MB broadcast at 12.5 MB/s waits 80 - 5 ms for the wire (a 5 ms bucket). Measured at
    exactly that, the 3 ms floor ran under the transfer: at 4x it takes (20 - 5) ms. Measured
    3 ms above it (the transfer's ramp on the slow link), it shrinks with its wait: 15 x 78 /
    75 ms. Never below the floor: at 16x the wire is gone."""
    from dpkfac.core.profile import MeasuredPoints

    floor, wait = 0.003, 0.075
    for measured, want in ((wait, 0.015), (wait + 0.003, 0.015 * 78 / 75)):
        points = MeasuredPoints((1024, 1_000_000), (floor, measured))
        faster = points.faster_link(4.0, wire_s_per_byte=1 / 12.5e6, burst_s=0.005)
        assert faster.seconds == pytest.approx((floor, want))
    points = MeasuredPoints((1024, 1_000_000), (floor, wait))
    assert points.faster_link(16.0, wire_s_per_byte=1 / 12.5e6, burst_s=0.005).seconds[1] \
        == pytest.approx(floor)
    # a call inside the bucket at the measured rate, and one measured at 0 s (synthetic)
    inside = MeasuredPoints((1024, 50_000), (0.0, 0.001))
    assert inside.faster_link(0.5, wire_s_per_byte=1 / 12.5e6, burst_s=0.005).seconds == \
        pytest.approx((0.0, 0.001 + 0.008 - 0.005))
    assert inside.faster_link(4.0, wire_s_per_byte=1 / 12.5e6, burst_s=0.005).seconds == \
        pytest.approx((0.0, 0.001))


def test_bandwidth_scaling_keeps_the_hosts_measured_cpu_seconds_of_an_allreduce():
    """On a slow link the hosts' work of an all-reduce runs under the transfer and the curve
    shows only the wire; on a 4x faster one the all-reduce still takes the CPU seconds the
    profile measured for it (gradient_allreduce_cpu_s, per byte), the broadcast does not. The
    latency floor is the least measured time, even when a smaller message read slower."""
    from dpkfac.core.profile import CommCosts, MeasuredPoints
    from planner.whatif.sweep import scale_bandwidth

    base = profile_from_dict(synthetic_profile_dict(2, 0, world_size=2))
    grad = base.model_grad_bytes
    sizes, wire = (1024, 4096, grad), grad / 12.5e6
    ack = wire * (1 + TCP_REVERSE_ACK_SHARE)  # the all-reduce's wire carries ACKs too
    points = MeasuredPoints(sizes, (0.004, 0.003, 0.003 + wire))  # all of it on the wire
    for cpu, want in ((None, (0.003 + ack) / 4), (wire / 2, 0.003 + wire / 2),
                      (2 * wire, 0.003 + ack)):  # the host part: at most what was measured
        comm = CommCosts(backend="gloo", world_size=2, allreduce=base.comm.allreduce,
                         broadcast=base.comm.broadcast,
                         allreduce_points=MeasuredPoints(sizes, (0.004, 0.003, 0.003 + ack)),
                         broadcast_points=points, link_bytes_per_s=12.5e6,
                         gradient_allreduce_cpu_s=cpu)
        faster = scale_bandwidth(dataclasses.replace(base, comm=comm), 4.0).comm
        assert faster.allreduce_points.seconds[2] == pytest.approx(want)
        assert faster.broadcast_points.seconds[2] == pytest.approx((0.003 + wire) / 4)
        assert faster.allreduce_points.seconds[1] == pytest.approx(0.003)  # the floor stays
