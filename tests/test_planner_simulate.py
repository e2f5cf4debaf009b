"""The event-level step simulation against hand-computed schedules, and staggering."""
from __future__ import annotations

import pytest

from planner.model.costs import PlanConfig, predict
from dpkfac.core.profile import profile_from_dict
from planner.model.simulate import cycle_length, simulate_cycle, simulate_step
from planner.model.stagger import per_slot_makespan_s, stagger_decompositions

from planner_fixtures import synthetic_profile_dict


def hand_profile(*, world_size: int = 2) -> dict:
    """Three layers with round numbers; alpha 1 ms, beta 1 ns/byte measured at 2 ranks
    (so at 2 ranks a broadcast of n bytes is 1 ms + n ns, an all-reduce the same)."""
    doc = synthetic_profile_dict(3, 0, world_size=world_size, alpha_s=1e-3, beta_s_per_byte=1e-9,
                                 forward_backward_s=0.1, optimizer_s=0.01)
    costs = [(1.0, 2.0, 3.0, 250), (0.5, 1.0, 0.5, 250), (0.25, 4.0, 0.25, 500)]
    for layer, (factor, decompose, precondition, numel) in zip(doc["layers"], costs):
        layer.update(factor_a_s=factor, factor_g_s=0.0, decompose_a_s=decompose,
                     decompose_g_s=0.0, precondition_s=precondition, grad_numel=numel,
                     dim_a=numel, dim_g=1)
    return doc


def test_one_step_by_hand():
    profile = profile_from_dict(hand_profile())
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=PlanConfig())
    allreduce = 1e-3 + 1000 * 4 * 1e-9
    rank0, rank1 = 6.0 + 2.0, 4.5                     # factors + decompose + precondition
    b0, b1 = 1e-3 + 2000 * 1e-9, 1e-3 + 2000 * 1e-9  # 500 floats each
    # collective broadcasts start when the slowest rank (0) is done, rank order, serialised
    second = rank0 + b0 + b1
    assert step.second_order_s == pytest.approx(second)
    assert step.step_time_s == pytest.approx(0.1 + allreduce + second + 0.01)
    assert step.busy_s == pytest.approx((0.1 + rank0 + 0.01, 0.1 + rank1 + 0.01))
    assert step.comm_s == pytest.approx((allreduce + b0 + b1,) * 2)
    assert step.idle_s == pytest.approx((0.0, rank0 - rank1))
    kinds = [(s.kind, s.worker) for s in step.critical_path]
    assert kinds == [("forward_backward", 0), ("allreduce", None), ("factors", 0),
                     ("decompose", 0), ("precondition", 0), ("broadcast", 0), ("broadcast", 1),
                     ("optimizer", 0)]
    path = step.critical_path
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(path, path[1:]))
    assert path[-1].end_s == pytest.approx(step.step_time_s)


def test_owner_mode_overlaps_an_early_owners_broadcast():
    profile = profile_from_dict(hand_profile())
    # rank 0 (layer 2 only: 4.5 s) finishes before rank 1 (layers 0, 1: 8 s)
    collective = simulate_step(profile, owners=[1, 1, 0], workers=2, config=PlanConfig())
    owner = simulate_step(profile, owners=[1, 1, 0], workers=2, config=PlanConfig(),
                          broadcast_mode="owner")
    b = 1e-3 + 2000 * 1e-9
    assert collective.second_order_s == pytest.approx(8.0 + 2 * b)
    assert owner.second_order_s == pytest.approx(8.0 + b)   # rank 0's went out during compute
    assert owner.step_time_s < collective.step_time_s


def test_equals_the_closed_form_at_frequency_one():
    profile = profile_from_dict(synthetic_profile_dict(9, 4))
    for owners in ([0, 1, 2] * 3, [0] * 9, [2, 2, 1, 0, 0, 1, 2, 2, 2]):
        sim = simulate_step(profile, owners=owners, workers=3, config=PlanConfig())
        pred = predict(profile, owners=owners, workers=3, config=PlanConfig())
        assert sim.step_time_s == pytest.approx(pred.step_time_s)
        assert sim.second_order_s == pytest.approx(pred.second_order_s)


def test_slower_worker_stretches_its_phases():
    profile = profile_from_dict(hand_profile())
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=PlanConfig(),
                         speeds=[1.0, 0.25])
    # rank 1 now needs 4.5 / 0.25 = 18 s and its forward/backward 0.4 s
    assert step.compute_makespan_s == pytest.approx(18.0)
    assert step.critical_path[0].worker == 1


def test_cycle_by_hand_and_amortised_bound():
    profile = profile_from_dict(hand_profile())
    config = PlanConfig(factor_update_freq=2, inv_update_freq=4)
    assert cycle_length(config) == 4
    cycle = simulate_cycle(profile, owners=[0, 0, 1], workers=2, config=config)
    makespans = [s.compute_makespan_s for s in cycle.steps]
    # step 0: factors + decompositions + precondition; step 2: factors + precondition;
    # steps 1, 3: precondition only
    assert makespans == pytest.approx([max(1.5 + 3 + 3.5, 0.25 + 4 + 0.25),
                                       3.5, 1.5 + 3.5, 3.5])
    amortised = predict(profile, owners=[0, 0, 1], workers=2, config=config)
    assert cycle.mean_second_order_s >= amortised.second_order_s - 1e-12


def test_staggering_spreads_each_workers_decompositions():
    doc = hand_profile()
    doc["layers"][1]["decompose_a_s"] = 2.0
    profile = profile_from_dict(doc)
    config = PlanConfig(inv_update_freq=2)
    owners = [0, 0, 1]
    slots = stagger_decompositions(profile, owners=owners, workers=2, config=config)
    assert sorted(slots[:2]) == [0, 1]                  # rank 0's two decompositions split
    executor = per_slot_makespan_s(profile, owners=owners, workers=2, config=config, slots=None)
    staggered = per_slot_makespan_s(profile, owners=owners, workers=2, config=config,
                                    slots=slots)
    assert max(staggered) < max(executor)
    base = simulate_cycle(profile, owners=owners, workers=2, config=config)
    spread = simulate_cycle(profile, owners=owners, workers=2, config=config,
                            decomposition_step=slots)
    assert spread.mean_step_time_s <= base.mean_step_time_s + 1e-12
    assert stagger_decompositions(profile, owners=owners, workers=2,
                                  config=PlanConfig()) == (0, 0, 0)


def test_one_worker_has_no_communication():
    profile = profile_from_dict(hand_profile())
    step = simulate_step(profile, owners=[0, 0, 0], workers=1, config=PlanConfig())
    assert step.allreduce_s == 0 and step.comm_s == (0.0,)
    assert step.step_time_s == pytest.approx(0.1 + 12.5 + 0.01)
