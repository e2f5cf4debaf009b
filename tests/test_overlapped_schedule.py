"""The overlapped step in the step model: owners' local phases under the gradient all-reduce."""
from __future__ import annotations

import pytest

from dpkfac.core.profile import profile_from_dict
from dpkfac.core.step import PHASES
from planner.model.costs import PlanConfig
from planner.model.simulate import simulate_step
from planner.model.step import predict_step

from planner_fixtures import synthetic_profile_dict
from test_planner_simulate import COUNTERS, hand_profile

OVERLAPPED, SERIAL = PlanConfig(), PlanConfig(overlap=False)


def on_a_link(doc: dict) -> dict:
    """The profile document with a link rate so slow that its all-reduce is all wire time
    (what an overlapped step can hide)."""
    doc["comm"]["link_bytes_per_s"] = 1.0
    return doc


def test_local_work_longer_than_the_all_reduce_hides_it():
    profile = profile_from_dict(on_a_link(hand_profile()))
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED)
    serial = simulate_step(profile, owners=[0, 0, 1], workers=2, config=SERIAL)
    allreduce = 1e-3 + 1000 * 4 * 1e-9
    local0, local1 = 1.5 + 3.0, 0.25 + 4.0          # factors + decompositions
    b = 2 * (1e-3 + (2000 + COUNTERS) * 1e-9)        # both owners' broadcasts
    assert step.step_time_s == pytest.approx(0.1 + local0 + 3.5 + b + 0.01)
    assert serial.step_time_s - step.step_time_s == pytest.approx(allreduce)
    assert step.phases_s["allreduce"] == (0.0, 0.0)   # nobody waits for it
    assert step.comm_s == pytest.approx((b,) * 2)       # the hidden all-reduce is not comm
    assert step.idle_s == pytest.approx((0.0, local0 - local1 + 3.5 - 0.25))
    assert step.second_order_s == pytest.approx(local0 + 3.5 + b - allreduce)
    kinds = [(s.kind, s.worker) for s in step.critical_path]
    assert kinds == [("forward_backward", 0), ("factors", 0), ("decompose", 0),
                     ("precondition", 0), ("broadcast", None), ("optimizer", 0)]
    assert local1 < local0


def test_an_all_reduce_longer_than_the_local_work_is_waited_for():
    doc = on_a_link(hand_profile())
    doc["comm"]["allreduce"]["alpha_s"] = 10.0        # a slow all-reduce: 10 s at 2 ranks
    profile = profile_from_dict(doc)
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED)
    allreduce = 10.0 + 1000 * 4 * 1e-9
    assert step.phases_s["allreduce"] == pytest.approx((allreduce - 4.5, allreduce - 4.25))
    assert step.comm_s[0] == pytest.approx(allreduce - 4.5 + 2 * (1e-3 + (2000 + COUNTERS)
                                                                  * 1e-9))
    b = 2 * (1e-3 + (2000 + COUNTERS) * 1e-9)
    assert step.step_time_s == pytest.approx(0.1 + allreduce + 3.5 + b + 0.01)
    kinds = [(s.kind, s.worker) for s in step.critical_path]
    assert kinds == [("forward_backward", 0), ("allreduce", None), ("precondition", 0),
                     ("broadcast", None), ("optimizer", 0)]
    path = step.critical_path
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("variant", ["sgd", "mpd-kfac", "kaisa-comm-opt", "kaisa-mem-opt"])
def test_strategies_without_local_factors_run_serially(variant):
    profile = profile_from_dict(synthetic_profile_dict(9, 4))
    owners = [0, 1, 2] * 3
    a, b = (predict_step(profile, variant=variant, owners=owners, workers=3, config=c)
            for c in (OVERLAPPED, SERIAL))
    assert a.step_time_s == b.step_time_s


def test_overlap_never_slower_and_phase_timers_add_up():
    profile = profile_from_dict(synthetic_profile_dict(9, 4))
    for owners in ([0, 1, 2] * 3, [0] * 9, [2, 2, 1, 0, 0, 1, 2, 2, 2]):
        for config in (PlanConfig(inv_update_freq=3), OVERLAPPED):
            over = predict_step(profile, variant="dp-kfac", owners=owners, workers=3,
                                config=config)
            serial = predict_step(profile, variant="dp-kfac", owners=owners, workers=3,
                                  config=PlanConfig(inv_update_freq=config.inv_update_freq,
                                                    overlap=False))
            assert over.step_time_s <= serial.step_time_s + 1e-12
            for step in over.cycle.steps:
                for rank in range(3):
                    assert sum(step.phases_s[p][rank] for p in PHASES) == pytest.approx(
                        step.step_time_s)


def test_without_a_link_rate_nothing_hides_and_only_the_wire_part_does():
    """A loopback profile cannot tell wire from host: its all-reduce needs the CPU, so the
    overlapped step is the serial one. With a link rate, the wire part hides and the rest
    (here the 1 ms latency term) does not."""
    doc = hand_profile()
    a, b = (simulate_step(profile_from_dict(doc), owners=[0, 0, 1], workers=2, config=c)
            for c in (OVERLAPPED, SERIAL))
    assert a.step_time_s == pytest.approx(b.step_time_s)
    doc["comm"]["link_bytes_per_s"] = 1e9           # 4000 B of gradient: 4 us on the wire
    wire = simulate_step(profile_from_dict(doc), owners=[0, 0, 1], workers=2, config=OVERLAPPED)
    assert b.step_time_s - wire.step_time_s == pytest.approx(4000 / 1e9)


def test_one_worker_has_nothing_to_overlap():
    profile = profile_from_dict(hand_profile(world_size=1))
    a, b = (simulate_step(profile, owners=[0, 0, 0], workers=1, config=c)
            for c in (OVERLAPPED, SERIAL))
    assert a.step_time_s == b.step_time_s


def test_plan_records_the_schedule_and_no_overlap_predicts_the_serial_step(tmp_path):
    import json

    from dpkfac.cli import main

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(on_a_link(synthetic_profile_dict(6, 2, world_size=2))))
    steps = {}
    for name, flags in (("overlapped", ()), ("serial", ("--no-overlap",))):
        out = tmp_path / f"{name}.json"
        assert main(["plan", "--profile", str(profile), "--workers", "2", "--out", str(out),
                     *flags]) == 0
        placement = json.loads(out.read_text())
        assert placement["config"]["overlap"] is (name == "overlapped")
        steps[name] = placement["predicted"]["step_time_s"]
    assert steps["overlapped"] < steps["serial"]
