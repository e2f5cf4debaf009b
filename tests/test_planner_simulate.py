"""The event-level step simulation against hand-computed schedules, and staggering."""
from __future__ import annotations

import pytest

from dpkfac.core.profile import profile_from_dict
from dpkfac.core.step import PHASES
from dpkfac.core.strategy import KAISA_COMM_OPT, MPD_KFAC
from planner.model.costs import PlanConfig, network_of
from planner.model.simulate import cycle_length, simulate_cycle, simulate_step
from planner.model.step import predict_step
from planner.model.stagger import per_slot_makespan_s, stagger_decompositions

from planner_fixtures import synthetic_profile_dict


COUNTERS = 16  # bytes of numerics counters at the end of each owner's broadcast
SERIAL = PlanConfig(overlap=False)  # the schedules by hand here are serial (overlapped: below)


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
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=SERIAL)
    allreduce = 1e-3 + 1000 * 4 * 1e-9
    rank0, rank1 = 6.0 + 2.0, 4.5                     # factors + decompose + precondition
    b0 = b1 = 1e-3 + (2000 + COUNTERS) * 1e-9       # 500 floats and the counters each
    # the broadcasts start when the slowest rank (0) is done, posted together (overlap 1)
    second = rank0 + b0 + b1
    assert step.second_order_s == pytest.approx(second)
    assert step.step_time_s == pytest.approx(0.1 + allreduce + second + 0.01)
    assert step.busy_s == pytest.approx((0.1 + rank0 + 0.01, 0.1 + rank1 + 0.01))
    assert step.comm_s == pytest.approx((allreduce + b0 + b1,) * 2)
    assert step.idle_s == pytest.approx((0.0, rank0 - rank1))
    kinds = [(s.kind, s.worker) for s in step.critical_path]
    assert kinds == [("forward_backward", 0), ("allreduce", None), ("factors", 0),
                     ("decompose", 0), ("precondition", 0), ("broadcast", None),
                     ("optimizer", 0)]
    assert step.critical_path[5].count == 2
    path = step.critical_path
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(path, path[1:]))
    assert path[-1].end_s == pytest.approx(step.step_time_s)


def test_second_order_is_the_slowest_compute_plus_the_broadcasts_at_frequency_one():
    profile = profile_from_dict(synthetic_profile_dict(9, 4))
    for owners in ([0, 1, 2] * 3, [0] * 9, [2, 2, 1, 0, 0, 1, 2, 2, 2]):
        pred = predict_step(profile, variant="dp-kfac", owners=owners, workers=3,
                            config=SERIAL)
        step = pred.cycle.steps[0]
        # broadcasts go in rank order, those of owners done early start before the rest is
        # done: at most the slowest compute plus all broadcasts, exactly that with one owner
        assert step.second_order_s <= max(pred.compute_s) + step.broadcast_s + 1e-12
        if len(set(owners)) == 1:
            assert step.second_order_s == pytest.approx(max(pred.compute_s) + step.broadcast_s)
        assert step.step_time_s == pytest.approx(
            profile.forward_backward_s + step.allreduce_s + step.second_order_s
            + profile.apply_s + profile.optimizer_s)
        for rank in range(3):  # the phase timers of every rank add up to the step
            assert sum(step.phases_s[p][rank] for p in PHASES) == pytest.approx(
                step.step_time_s)


def test_allreduced_factors_by_hand():
    """MPD-KFAC: every worker builds every layer's factors, one all-reduce of all factors,
    then the owners decompose, precondition and broadcast as DP-KFAC."""
    profile = profile_from_dict(hand_profile())
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=PlanConfig(),
                         strategy=MPD_KFAC)
    factors = 1.0 + 0.5 + 0.25
    factor_bytes = 4 * sum(d * d + 1 for d in (250, 250, 500))
    reduce = 1e-3 + factor_bytes * 1e-9
    rank0, rank1 = 2.0 + 1.0 + 3.0 + 0.5, 4.0 + 0.25      # decompose + precondition
    b = 1e-3 + (2000 + COUNTERS) * 1e-9
    assert step.second_order_s == pytest.approx(factors + reduce + rank0 + 2 * b)
    assert step.phases_s["factor_allreduce"] == pytest.approx((reduce, reduce))
    assert step.phases_s["factors"] == pytest.approx((factors, factors))
    # rank 1, the last owner, is done once rank 0's broadcast has reached it (b after rank 0
    # is): its own broadcast's bytes are buffered, rank 0 reads them after it has gone on
    assert step.phases_s["broadcast"] == pytest.approx((2 * b, b + rank0 - rank1))


def test_shared_decompositions_by_hand():
    """KAISA COMM-OPT: decompositions broadcast at decomposition updates, then every worker
    preconditions every layer; no broadcast on the other steps."""
    profile = profile_from_dict(hand_profile())
    config = PlanConfig(inv_update_freq=2)
    cycle = simulate_cycle(profile, owners=[0, 0, 1], workers=2, config=config,
                           strategy=KAISA_COMM_OPT)
    factors = 1.0 + 0.5 + 0.25
    reduce = 1e-3 + 4 * sum(d * d + 1 for d in (250, 250, 500)) * 1e-9
    eigen = [4 * (d * d + d + 1 + 1) for d in (250, 250, 500)]  # dim_g 1: q 1x1, d 1
    b0, b1 = (1e-3 + (eigen[0] + eigen[1] + COUNTERS) * 1e-9,
              1e-3 + (eigen[2] + COUNTERS) * 1e-9)
    precondition = 3.0 + 0.5 + 0.25
    first, second = cycle.steps
    assert first.second_order_s == pytest.approx(factors + reduce + 4.0 + b0 + b1
                                                 + precondition)
    assert second.second_order_s == pytest.approx(factors + reduce + precondition)
    assert second.broadcast_s == 0


def test_sgd_has_no_second_order_part():
    profile = profile_from_dict(hand_profile())
    step = simulate_step(profile, owners=[], workers=2, config=PlanConfig(), strategy=None)
    allreduce = 1e-3 + 1000 * 4 * 1e-9
    assert step.second_order_s == 0
    assert step.step_time_s == pytest.approx(0.1 + allreduce + 0.01)


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
    amortised = predict_step(profile, variant="dp-kfac", owners=[0, 0, 1], workers=2,
                             config=config)
    assert cycle.mean_second_order_s >= max(amortised.compute_s) - 1e-12


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


def test_a_broadcasts_root_begins_the_next_step_while_its_bytes_are_read():
    """The owner's broadcast returns once its bytes are buffered: in steady state its next
    forward/backward and local phases (overlapped: under the gradient all-reduce) run while
    the other rank still reads, so a step is the owner's own chain plus the root's fixed
    cost, not plus the whole transfer; one step from a standing start still has it all."""
    doc = hand_profile()
    doc["comm"]["broadcast"].update(alpha_s=1e-3, beta_s_per_byte=1e-3)  # 4 KB: about 4 s
    profile = profile_from_dict(doc)
    owners, overlapped = [1, 1, 1], PlanConfig()
    net = network_of(profile)
    transfer = net.broadcast_s(ranks=2, nbytes=4000 + COUNTERS)
    root = net.broadcast_root_s(ranks=2, nbytes=4000 + COUNTERS)
    assert transfer > 4.0 and root == pytest.approx(1e-3)
    standing = simulate_step(profile, owners=owners, workers=2, config=overlapped)
    steady = simulate_cycle(profile, owners=owners, workers=2, config=overlapped).steps[0]
    allreduce = 1e-3 + 1000 * 4 * 1e-9  # no link rate: all of it the owner's CPU's
    chain = (0.1 + allreduce + (1.0 + 0.5 + 0.25) + (2.0 + 1.0 + 4.0) + (3.0 + 0.5 + 0.25)
             + root + 0.01)
    assert steady.step_time_s == pytest.approx(chain)
    assert standing.step_time_s == pytest.approx(chain - root + transfer)
    assert steady.phases_s["broadcast"][1] == pytest.approx(root)
    assert steady.leads() == pytest.approx([0.0, root - transfer])
    for rank in range(2):  # each rank's timers add up to the step in steady state
        assert sum(steady.phases_s[p][rank] for p in PHASES) == pytest.approx(chain)
    # serial, the gradient all-reduce waits for both ranks: the owner's head start is lost
    serial = simulate_cycle(profile, owners=owners, workers=2, config=SERIAL).steps[0]
    assert serial.step_time_s == pytest.approx(
        simulate_step(profile, owners=owners, workers=2, config=SERIAL).step_time_s)


def test_a_measured_root_time_is_what_the_last_owner_pays_for_its_broadcast():
    """With the root's own seconds measured (comm.broadcast.root_seconds), the last owner is
    charged those, interpolated at its broadcast's size, not the broadcast's least time; and
    never more than the whole broadcast."""
    doc = hand_profile()
    doc["comm"]["message_bytes"] = [1024, 16384]
    doc["comm"]["broadcast"].update(seconds=[3e-3, 5e-3], root_seconds=[2e-4, 6e-4])
    profile = profile_from_dict(doc)
    net = network_of(profile)
    nbytes = 4000 + COUNTERS
    expected = 2e-4 + (nbytes - 1024) / (16384 - 1024) * 4e-4
    assert net.broadcast_root_s(ranks=2, nbytes=nbytes) == pytest.approx(expected)
    steady = simulate_cycle(profile, owners=[1, 1, 1], workers=2, config=PlanConfig()).steps[0]
    assert steady.phases_s["broadcast"][1] == pytest.approx(expected)
    doc["comm"]["broadcast"]["root_seconds"] = [9.0, 9.0]  # longer than the broadcast itself
    capped = network_of(profile_from_dict(doc))
    assert capped.broadcast_root_s(ranks=2, nbytes=nbytes) == pytest.approx(
        capped.broadcast_s(ranks=2, nbytes=nbytes))
