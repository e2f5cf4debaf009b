"""Gradient buckets posted from backward, broadcasts in owner rank order, and the relabel pass:
the profile field, by-hand schedules, and the planner pieces that follow them."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from dpkfac.core.cluster import flat_cluster
from dpkfac.core.errors import InputError
from dpkfac.core.profile import (GradientBucket, load_profile, profile_from_dict,
                                 profile_to_dict)
from dpkfac.core.step import PHASES
from planner.model.calibrate import calibrate, predicted_phases
from planner.model.costs import PlanConfig, second_order_lower_bound_s
from planner.model.network import network_from_profile
from planner.model.buckets import bucket_costs, chained_fraction
from planner.model.simulate import simulate_step
from planner.model.step import predict_step
from planner.placement import placement_document
from planner.plan import _relabel_pass, make_plan
from planner.report.explain import explain_lines
from planner.solve.relabel import interchangeable, relabelled, relabelling
from planner.whatif.sweep import scale_bandwidth, scale_batch

from planner_fixtures import run_planner_cli, synthetic_profile_dict
from test_planner_simulate import COUNTERS, hand_profile

OVERLAPPED, SERIAL = PlanConfig(), PlanConfig(overlap=False)
BUCKETS = [{"bytes": 9000, "ready_s": 0.2}, {"bytes": 1000, "ready_s": 1.0}]


def bucketed(doc: dict, buckets=BUCKETS) -> dict:
    doc["step"]["gradient_buckets"] = [dict(b) for b in buckets]
    return doc


def slow_link_profile(buckets=BUCKETS, **step) -> dict:
    """The hand profile with a 1 s forward/backward, a 10 kB gradient and an all-reduce that
    is all wire (link rate 1 B/s): at 2 ranks n bytes take 1 ms + n * 0.1 ms; no local work,
    so the all-reduce is waited for."""
    doc = hand_profile()
    doc["model_grad_numel"] = 2500  # 10,000 bytes
    doc["step"].update(forward_backward_s=1.0, **step)
    doc["comm"]["allreduce"].update(alpha_s=1e-3, beta_s_per_byte=1e-4)
    doc["comm"]["link_bytes_per_s"] = 1.0
    for layer in doc["layers"]:
        layer.update(factor_a_s=0.0, decompose_a_s=0.0)
    return bucketed(doc, buckets) if buckets is not None else doc


# --- the profile field ----------------------------------------------------------------------

def test_round_trip_with_and_without_buckets(tmp_path):
    plain = profile_from_dict(hand_profile())
    assert plain.gradient_buckets == ()
    assert "gradient_buckets" not in profile_to_dict(plain)["step"]
    profile = profile_from_dict(bucketed(hand_profile()))
    assert profile.gradient_buckets == (GradientBucket(9000, 0.2), GradientBucket(1000, 1.0))
    doc = profile_to_dict(profile)
    assert doc["step"]["gradient_buckets"] == BUCKETS
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    assert load_profile(path) == profile
    assert profile_from_dict(profile_to_dict(plain)) == plain


@pytest.mark.parametrize("bad, where", [({"bytes": -1, "ready_s": 0.1}, "0/bytes"),
                                        ({"bytes": 10, "ready_s": -0.1}, "0/ready_s"),
                                        ({"bytes": 1.5, "ready_s": 0.1}, "0/bytes"),
                                        ({"bytes": 10}, "0"),
                                        ({"bytes": 10, "ready_s": 0.1, "x": 1}, "0")])
def test_schema_rejects_bad_buckets(bad, where):
    with pytest.raises(InputError, match=f"field step/gradient_buckets/{where}:"):
        profile_from_dict(bucketed(hand_profile(), [bad]))


# --- the bucketed gradient all-reduce -------------------------------------------------------

def test_one_bucket_at_the_end_of_backward_is_the_fused_all_reduce_exactly():
    plain = profile_from_dict(on_a_link(hand_profile()))
    one = profile_from_dict(bucketed(on_a_link(hand_profile()),
                                     [{"bytes": plain.model_grad_bytes,
                                       "ready_s": plain.forward_backward_s}]))
    for config in (OVERLAPPED, SERIAL):
        for speeds in (None, [1.0, 1.7]):
            a, b = (simulate_step(p, owners=[0, 0, 1], workers=2, config=config,
                                  speeds=speeds) for p in (plain, one))
            assert a == b


def on_a_link(doc: dict) -> dict:
    doc["comm"]["link_bytes_per_s"] = 1.0
    return doc


def test_an_early_bucket_hides_its_wire_time_under_the_rest_of_backward():
    profile = profile_from_dict(slow_link_profile())
    fused = profile_from_dict(slow_link_profile(buckets=None))
    d0, d1 = 1e-3 + 9000 * 1e-4, 1e-3 + 1000 * 1e-4
    # bucket 0 from 0.2 s (ready) to 1.101 s; bucket 1 ready at 1.0 s waits for it: to 1.202 s
    end = 0.2 + d0 + d1
    fused_end = 1.0 + 1e-3 + 10_000 * 1e-4
    for variant in ("dp-kfac", "sgd"):
        step = predict_step(profile, variant=variant, owners=[0, 0, 1], workers=2,
                            config=OVERLAPPED).cycle.steps[0]
        old = predict_step(fused, variant=variant, owners=[0, 0, 1], workers=2,
                           config=OVERLAPPED).cycle.steps[0]
        # dp-kfac: rank 1, the last owner, began the step b earlier (done with the step before
        # once rank 0's broadcast had reached it), so it waits that much longer
        b = 1e-3 + (2000 + COUNTERS) * 1e-9 if variant == "dp-kfac" else 0.0
        assert step.phases_s["allreduce"] == pytest.approx((end - 1.0, end - 1.0 + b))
        assert old.step_time_s - step.step_time_s == pytest.approx(fused_end - end)
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED,
                         strategy=None, speeds=[1.0, 2.0])  # rank 1 has both ready earlier
    assert step.step_time_s == pytest.approx(end + 0.01)
    path = [(s.kind, s.worker, s.start_s, s.end_s, s.count) for s in step.critical_path]
    assert path == [("forward_backward", 0, 0.0, pytest.approx(0.2), 1),
                    ("allreduce", None, pytest.approx(0.2), pytest.approx(end), 2),
                    ("optimizer", 0, pytest.approx(end), pytest.approx(end + 0.01), 1)]
    # a bucket that is ready only at the end of backward hides nothing
    late = profile_from_dict(slow_link_profile([{"bytes": 9000, "ready_s": 1.0},
                                                {"bytes": 1000, "ready_s": 1.0}]))
    step = simulate_step(late, owners=[0, 0, 1], workers=2, config=OVERLAPPED, strategy=None)
    assert step.step_time_s == pytest.approx(1.0 + d0 + d1 + 0.01)


def test_the_serial_step_runs_the_buckets_back_to_back_after_backward():
    profile = profile_from_dict(slow_link_profile(pack_s=0.01))
    d0, d1 = 0.009 + 1e-3 + 9000 * 1e-4, 0.001 + 1e-3 + 1000 * 1e-4  # pack_s shared by bytes
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=SERIAL)
    assert step.allreduce_s == pytest.approx(d0 + d1)
    assert step.phases_s["allreduce"] == pytest.approx((d0 + d1,) * 2)
    assert [s.count for s in step.critical_path if s.kind == "allreduce"] == [2]
    overlapped = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED)
    assert overlapped.step_time_s < step.step_time_s


def test_posting_from_backward_adds_its_measured_cost_to_forward_backward_only_then():
    # the buckets' all-reduces take 0.1 s of the 1 s forward/backward's cores when posted from it
    base = profile_from_dict(slow_link_profile(pack_s=0.01))
    profile = profile_from_dict(slow_link_profile(pack_s=0.01, backward_allreduce_s=0.1))
    assert profile_from_dict(profile_to_dict(profile)) == profile
    assert "backward_allreduce_s" not in profile_to_dict(base)["step"]
    for variant in ("dp-kfac", "sgd"):
        steps = {name: predict_step(p, variant=variant, owners=[0, 0, 1], workers=2,
                                    config=config).cycle.steps[0]
                 for name, p, config in (("base", base, OVERLAPPED), ("new", profile, OVERLAPPED),
                                         ("serial", profile, SERIAL),
                                         ("base serial", base, SERIAL))}
        assert steps["new"].phases_s["forward_backward"] == pytest.approx((1.1, 1.1))
        assert steps["base"].phases_s["forward_backward"] == pytest.approx((1.0, 1.0))
        assert steps["serial"].step_time_s == pytest.approx(steps["base serial"].step_time_s)
        # bucket 0 still ready at 0.2 s: on this slow link the chain ends when it did
        assert steps["new"].step_time_s == pytest.approx(steps["base"].step_time_s)
    fast = {}
    for extra in (0.0, 0.1):
        doc = slow_link_profile(pack_s=0.01, backward_allreduce_s=extra)
        doc["comm"]["allreduce"].update(alpha_s=1e-6, beta_s_per_byte=1e-9)
        fast[extra] = predict_step(profile_from_dict(doc), variant="sgd", owners=[0, 0, 1],
                                   workers=2, config=OVERLAPPED).cycle.steps[0].step_time_s
    assert fast[0.1] - fast[0.0] == pytest.approx(0.1)  # on a fast link the step ends later
    one = predict_step(profile, variant="sgd", owners=[0, 0, 0], workers=1,
                       config=OVERLAPPED).cycle.steps[0]
    assert one.phases_s["forward_backward"] == pytest.approx((1.0,))  # nothing posted alone


def chained_profile(chain_s: float | None) -> dict:
    """slow_link_profile with no link rate (nothing known to be on the wire), a 10 ms pack and
    the buckets' back-to-back all-reduce measured at `chain_s`: alone they take 0.901 s and
    0.101 s."""
    doc = slow_link_profile(pack_s=0.01)
    del doc["comm"]["link_bytes_per_s"]
    if chain_s is not None:
        doc["comm"]["gradient_buckets_s"] = chain_s
    return doc


def test_a_bucket_queued_behind_another_skips_what_the_measured_chain_saves():
    d0, d1 = 0.009 + 1e-3 + 9000 * 1e-4, 0.001 + 1e-3 + 1000 * 1e-4
    profile = profile_from_dict(chained_profile(0.951))  # 0.051 s less than alone
    assert chained_fraction(profile) == pytest.approx(0.951 / 1.002)
    costs = bucket_costs(profile, workers=2)
    assert [c.chained_s for c in costs] == pytest.approx([d0, d1 - 0.051])
    serial = simulate_step(profile, owners=[0, 0, 1], workers=2, config=SERIAL)
    assert serial.allreduce_s == pytest.approx(d0 + d1 - 0.051)
    assert serial.phases_s["allreduce"] == pytest.approx((d0 + d1 - 0.051,) * 2)
    # overlapped, nothing known to be on the wire: the hosts run the chain after backward
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED, strategy=None)
    assert step.step_time_s == pytest.approx(1.0 + d0 + d1 - 0.051 + 0.01)
    # a chain measured slower than its lone calls saves nothing; no measurement, nothing
    for chain_s in (1.5, None):
        slow = profile_from_dict(chained_profile(chain_s))
        assert chained_fraction(slow) == 1.0
        assert simulate_step(slow, owners=[0, 0, 1], workers=2, config=SERIAL
                             ).allreduce_s == pytest.approx(d0 + d1)


def test_the_measured_chain_round_trips_and_scales_with_the_collectives():
    profile = profile_from_dict(chained_profile(0.951))
    assert profile_to_dict(profile)["comm"]["gradient_buckets_s"] == 0.951
    assert profile_from_dict(profile_to_dict(profile)) == profile
    assert profile.comm.scaled(allreduce=2.0, broadcast=1.0).gradient_buckets_s == 1.902
    faster = scale_bandwidth(profile, 4.0)
    assert faster.comm.gradient_buckets_s < 0.951
    assert chained_fraction(faster) == pytest.approx(chained_fraction(profile))
    bad = chained_profile(-1.0)
    with pytest.raises(InputError, match="gradient_buckets_s"):
        profile_from_dict(bad)


def test_an_older_profiles_busy_pace_is_kept_as_a_note_and_changes_nothing():
    """Profiles from before dpkfac stopped modelling the chain's pace beside compute hold
    comm.busy_progress: it loads, round-trips as a note, and predicts as without it."""
    base = profile_from_dict(slow_link_profile())
    doc = slow_link_profile()
    doc["comm"]["busy_progress"] = 0.5
    older = profile_from_dict(doc)
    assert profile_to_dict(older)["comm"]["busy_progress"] == 0.5

    def step(profile):
        return predict_step(profile, variant="sgd", owners=[0, 0, 1], workers=2,
                            config=OVERLAPPED).cycle.steps[0].step_time_s
    assert step(older) == pytest.approx(step(base))


def test_the_hosts_part_of_the_buckets_still_takes_the_cpu():
    """Without a link rate nothing is on the wire: early buckets hide nothing of it, the
    worker's CPU runs every bucket's time after its forward/backward."""
    doc = slow_link_profile()
    del doc["comm"]["link_bytes_per_s"]
    profile = profile_from_dict(doc)
    d0, d1 = 1e-3 + 9000 * 1e-4, 1e-3 + 1000 * 1e-4
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED, strategy=None)
    assert step.step_time_s == pytest.approx(1.0 + d0 + d1 + 0.01)


# figures from the model without buckets (same profile, 3 ranks of speeds 1, 1.5, 2):
# (step_time_s, allreduce phase per rank); in steady state a rank done with a step early (a
# faster one, a broadcast's root) begins the next early and waits longer in the all-reduce
BEFORE = {
    ("sgd", True): (0.053168928000000004,
                    (0.0011689279999999996, 0.01850226133333334, 0.027168928000000002)),
    ("mpd-kfac", False): (0.2679167231111111,
                          (0.0011689279999999996, 0.018327215733333284, 0.026993882399999967)),
    ("kaisa-comm-opt", True): (0.16369610631111112,
                               (0.0011689279999999996, 0.027763990666666676, 0.04106152199999998)),
    ("dp-kfac", True): (0.26734460293333334, (0.001, 0.018327215733333284, 0.026993882399999967)),
    ("dp-kfac", False): (0.2675135309333333,
                         (0.0011689279999999996, 0.018327215733333284, 0.026993882399999967)),
}


@pytest.mark.parametrize("variant, overlap", sorted(BEFORE))
def test_a_profile_without_buckets_predicts_as_before(variant, overlap):
    doc = synthetic_profile_dict(9, 4)
    doc["comm"]["link_bytes_per_s"] = 1e7
    doc["step"]["pack_s"] = 1e-3
    owners = [0, 1, 2] * 3 if variant == "kaisa-comm-opt" else [0] * 9
    pred = predict_step(profile_from_dict(doc), variant=variant, owners=owners, workers=3,
                        config=PlanConfig(overlap=overlap), speeds=[1.0, 1.5, 2.0])
    step_s, allreduce = BEFORE[variant, overlap]
    assert pred.step_time_s == pytest.approx(step_s, rel=1e-12)
    assert pred.cycle.mean_phases()["allreduce"] == pytest.approx(allreduce, rel=1e-12)


# --- broadcasts in owner rank order ---------------------------------------------------------

def test_the_first_owner_done_broadcasts_under_the_others_preconditioning():
    profile = profile_from_dict(hand_profile())
    allreduce = 1e-3 + 1000 * 4 * 1e-9
    b = 1e-3 + (2000 + COUNTERS) * 1e-9             # each owner's broadcast
    t0 = 0.1 + allreduce
    # rank 0 owns layer 2 (4.25 s local, 0.25 s preconditioning), rank 1 layers 0, 1 (4.5 s
    # local, 3.5 s preconditioning): rank 0's broadcast may start once rank 0 is done (4.5 s)
    # and rank 1 has started preconditioning (4.5 s), so it runs under rank 1's
    # preconditioning; rank 1's starts at 8 s, and rank 1, its root, is done once its bytes are
    # buffered (the least broadcast, 1 ms)
    step = simulate_step(profile, owners=[1, 1, 0], workers=2, config=SERIAL)
    assert step.step_time_s == pytest.approx(t0 + 8.0 + b + 0.01)
    assert step.phases_s["broadcast"] == pytest.approx((3.5 + b, 1e-3))
    assert step.comm_s == pytest.approx((allreduce + 2 * b, allreduce + 1e-3))
    assert step.idle_s == pytest.approx((3.5 - b, b - 1e-3))  # rank 1 done that much earlier
    kinds = [(s.kind, s.worker) for s in step.critical_path]
    assert kinds == [("forward_backward", 0), ("allreduce", None), ("factors", 1),
                     ("decompose", 1), ("precondition", 1), ("broadcast", None),
                     ("optimizer", 0)]
    # the other labelling: rank 0, done last, broadcasts first; both wait for it (as before)
    swapped = simulate_step(profile, owners=[0, 0, 1], workers=2, config=SERIAL)
    assert swapped.step_time_s == pytest.approx(t0 + 8.0 + 2 * b + 0.01)
    assert swapped.critical_path[-2].count == 2


def test_when_every_rank_finishes_at_once_the_broadcasts_cost_what_they_did():
    doc = hand_profile()
    for layer in doc["layers"]:
        layer.update(factor_a_s=1.0, decompose_a_s=1.0, precondition_s=1.0)
    doc["comm"]["broadcast_overlap"] = 1.5
    profile = profile_from_dict(doc)
    net = network_from_profile(profile.comm)
    alone = [net.broadcast_s(ranks=3, nbytes=n * 4 + COUNTERS) for n in (250, 250, 500)]
    step = simulate_step(profile, owners=[0, 1, 2], workers=3, config=SERIAL)
    t0 = 0.1 + net.allreduce_s(ranks=3, nbytes=4000)
    assert step.step_time_s == pytest.approx(t0 + 3.0 + net.broadcast_group_s(alone) + 0.01)
    assert step.broadcast_s == net.broadcast_group_s(alone)
    assert net.broadcast_queue_end_s([2.0] * 3, alone) == (2.0 + net.broadcast_group_s(alone), 0)


def test_broadcast_queue_by_hand():
    net = network_from_profile(profile_from_dict(hand_profile()).comm)
    assert net.broadcast_queue_end_s([0.0, 1.0], [3.0, 1.0]) == (4.0, 0)   # one lane: a queue
    assert net.broadcast_queue_end_s([0.0, 5.0], [3.0, 1.0]) == (6.0, 1)
    two = dataclasses.replace(net, broadcast_overlap=2.0)
    assert two.broadcast_queue_end_s([0.0, 1.0], [3.0, 1.0]) == (3.0, 0)   # side by side


def test_split_shares_are_all_reduced_after_the_broadcasts():
    doc = hand_profile()
    doc["layers"][2].update(dim_a=50, dim_g=10)     # 500 elements, 10 rows to split
    profile = profile_from_dict(doc)
    config = PlanConfig(inv_update_freq=2, overlap=False)  # step 1: no decompositions
    step = simulate_step(profile, owners=[1, 0, 1], workers=2, config=config, step=1,
                         split={2: (5, 5)})
    net = network_from_profile(profile.comm)
    b = net.broadcast_s(ranks=2, nbytes=1000 + COUNTERS)  # each owner's: one unsplit layer
    shares = net.allreduce_s(ranks=2, nbytes=2000)
    t0 = 0.1 + net.allreduce_s(ranks=2, nbytes=4000)
    # rank 0: factors 0.5 s, preconditioning 0.5 + 0.125 s (done at 1.125 s); rank 1: factors
    # 1.25 s (preconditioning from 1.25 s), preconditioning 3 + 0.125 s (done at 4.375 s).
    # Rank 0's broadcast runs from 1.25 s, rank 1's from 4.375 s, then the shares' all-reduce
    assert step.step_time_s == pytest.approx(t0 + 4.375 + b + shares + 0.01)
    kinds = [s.kind for s in step.critical_path]
    assert kinds[-3:] == ["broadcast", "broadcast", "optimizer"]
    assert step.broadcast_s == pytest.approx(2 * b + shares)


@pytest.mark.parametrize("link", [None, 1e3])
def test_overlapped_split_shares_are_all_reduced_under_the_own_preconditioning(link):
    """Overlapped, every rank preconditions its shares first and their all-reduce runs while
    the ranks precondition their own layers: on a link (all of it on the wire) it hides; on
    loopback (none of it on the wire) its hosts' part delays the rank still computing."""
    doc = hand_profile()
    doc["layers"][2].update(dim_a=50, dim_g=10)
    if link:
        doc["comm"]["link_bytes_per_s"] = link
    profile = profile_from_dict(doc)
    step = simulate_step(profile, owners=[1, 0, 1], workers=2,
                         config=PlanConfig(inv_update_freq=2), step=1, split={2: (5, 5)})
    net = network_from_profile(profile.comm)
    b = net.broadcast_s(ranks=2, nbytes=1000 + COUNTERS)
    shares = net.allreduce_s(ranks=2, nbytes=2000)
    # the gradient all-reduce hides under the factors on the link, else its CPU part runs
    # first; rank 1 (factors 1.25 s, shares 0.125 s, its layer 3 s) posts the all-reduce at
    # 1.375 s and ends its preconditioning at 4.375 s (plus the all-reduce's CPU part)
    t0 = 0.1 + (0.0 if link else net.allreduce_s(ranks=2, nbytes=4000))
    assert step.step_time_s == pytest.approx(t0 + 4.375 + (0.0 if link else shares) + b + 0.01)
    assert step.broadcast_s == pytest.approx(2 * b + shares)
    serial = simulate_step(profile, owners=[1, 0, 1], workers=2,
                           config=PlanConfig(inv_update_freq=2, overlap=False), step=1,
                           split={2: (5, 5)})
    assert serial.step_time_s - step.step_time_s == pytest.approx(
        (0.1 + net.allreduce_s(ranks=2, nbytes=4000) - t0) + (shares if link else 0.0))


def test_overlapped_decomposition_step_preconditions_own_layers_under_the_split_decompositions():
    """On a decomposition step the overlapped order is own layers first, under the split
    layers' decomposition broadcasts, then the shares and (after the gradient broadcasts)
    their sum: rank 1, which decomposes the split layer last, computes its own layer while
    the broadcast runs; serial, every rank waits for it first."""
    doc = hand_profile()
    doc["layers"][2].update(dim_a=50, dim_g=10)
    profile = profile_from_dict(doc)
    kw = dict(owners=[1, 0, 1], workers=2, step=0, split={2: (5, 5)})
    step = simulate_step(profile, config=PlanConfig(inv_update_freq=2), **kw)
    serial = simulate_step(profile, config=PlanConfig(inv_update_freq=2, overlap=False), **kw)
    net = network_from_profile(profile.comm)
    decomposition = net.broadcast_s(ranks=2, nbytes=(50 * 51 + 10 * 11) * 4 + COUNTERS)
    b = net.broadcast_s(ranks=2, nbytes=1000 + COUNTERS)
    shares = net.allreduce_s(ranks=2, nbytes=2000)
    # rank 1: factors 1.25 s and decompositions 6 s, then its layer 3 s and its share 0.125 s;
    # rank 0 (done at 7.375 s plus the broadcast) broadcasts under that, rank 1 after it
    t0 = 0.1 + net.allreduce_s(ranks=2, nbytes=4000)
    assert step.step_time_s == pytest.approx(t0 + 10.375 + b + shares + 0.01)
    assert serial.step_time_s - step.step_time_s == pytest.approx(decomposition)


# --- lower bound ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_lower_bound_holds_with_buckets_and_ordered_broadcasts(seed):
    rng = random.Random(seed)
    doc = synthetic_profile_dict(7, seed, world_size=rng.choice([2, 4]))
    doc["comm"]["link_bytes_per_s"] = rng.choice([1e6, 1e8])
    grad = sum(l["grad_numel"] for l in doc["layers"]) * 4
    doc = bucketed(doc, [{"bytes": grad // 3, "ready_s": 0.01},
                         {"bytes": grad - grad // 3, "ready_s": 0.05}])
    profile = profile_from_dict(doc)
    for workers in (2, 3, 5):
        for config in (OVERLAPPED, SERIAL, PlanConfig(inv_update_freq=3)):
            bound = second_order_lower_bound_s(profile, workers=workers, config=config)
            for _ in range(10):
                owners = [rng.randrange(workers) for _ in profile.layers]
                pred = predict_step(profile, variant="dp-kfac", owners=owners,
                                    workers=workers, config=config, trace=False)
                assert bound <= pred.second_order_s * (1 + 1e-12)


# --- the relabel pass -----------------------------------------------------------------------

def test_relabelling_within_classes_and_rows_move_with_their_label():
    assert interchangeable([1.0, 2.0, 1.0, 1.0], None) == ((0, 2, 3),)
    assert interchangeable([1.0, 1.0, 1.0], [5, 6, 5]) == ((0, 2),)
    perm = relabelling([3.0, 9.0, 1.0, 2.0], ((0, 2, 3),))
    assert perm == (3, 1, 0, 2)   # ranks 2, 3, 0 (by key) take 0, 2, 3; rank 1 keeps 1
    owners, split = relabelled(perm, [0, 1, 2, 3], {5: (1, 2, 3, 4)})
    assert owners == (3, 1, 0, 2)
    assert split == {5: (3, 2, 4, 1)}


def test_the_relabel_pass_helps_where_the_late_owner_broadcasts_first():
    profile = profile_from_dict(hand_profile())
    speeds = (1.0, 1.0)
    before = predict_step(profile, variant="dp-kfac", owners=[0, 0, 1], workers=2,
                          config=SERIAL).step_time_s
    owners, split, changed = _relabel_pass(profile, [0, 0, 1], {}, config=SERIAL,
                                           speeds=speeds, network=None, caps=None)
    assert changed and owners == (1, 1, 0) and split == {}
    after = predict_step(profile, variant="dp-kfac", owners=owners, workers=2,
                         config=SERIAL).step_time_s
    b = 1e-3 + (2000 + COUNTERS) * 1e-9
    assert before - after == pytest.approx(b)
    # different speeds: not interchangeable, nothing moves
    assert _relabel_pass(profile, [0, 0, 1], {}, config=SERIAL, speeds=(1.0, 1.1),
                         network=None, caps=None)[2] is False


@pytest.mark.parametrize("seed", range(3))
def test_the_relabel_pass_never_predicts_worse(seed, monkeypatch):
    rng = random.Random(seed)
    doc = synthetic_profile_dict(8, seed)
    doc["comm"]["broadcast_overlap"] = rng.choice([1.0, 1.7])
    profile = profile_from_dict(doc)
    for workers in (2, 3, 4):
        for config in (OVERLAPPED, SERIAL):
            for _ in range(5):
                owners = [rng.randrange(workers) for _ in profile.layers]
                got, _, _ = _relabel_pass(profile, owners, {}, config=config,
                                          speeds=(1.0,) * workers, network=None, caps=None)
                steps = [predict_step(profile, variant="dp-kfac", owners=o, workers=workers,
                                      config=config).step_time_s for o in (got, owners)]
                assert steps[0] <= steps[1]
    with_pass = make_plan(profile=profile, cluster=flat_cluster(workers=3), config=SERIAL,
                          time_limit_s=0.2)
    monkeypatch.setattr("planner.plan._relabel_pass",
                        lambda profile, owners, split, **kw: (tuple(owners), dict(split), False))
    without = make_plan(profile=profile, cluster=flat_cluster(workers=3), config=SERIAL,
                        time_limit_s=0.2)
    assert with_pass.prediction.step_time_s <= without.prediction.step_time_s


def test_the_placement_records_the_relabel_pass(monkeypatch):
    profile = profile_from_dict(synthetic_profile_dict(6, 1))
    kept = make_plan(profile=profile, cluster=flat_cluster(workers=2), config=SERIAL,
                     time_limit_s=0.2)
    swap, calls = {0: 1, 1: 0}, []

    def relabel(profile, owners, split, **kw):  # the pass after the owner search swaps
        calls.append(owners)
        if len(calls) == 1:  # the pass before it keeps the labels
            return tuple(owners), dict(split), False
        return tuple(swap[o] for o in owners), dict(split), True
    monkeypatch.setattr("planner.plan._relabel_pass", relabel)
    renamed = make_plan(profile=profile, cluster=flat_cluster(workers=2), config=SERIAL,
                        time_limit_s=0.2)
    assert renamed.solution.owners == tuple(swap[o] for o in kept.solution.owners)
    for plan, applied in ((kept, kept.relabel.applied), (renamed, True)):
        record = placement_document(plan, profile_ref={"path": "p.json", "sha256": "0" * 64}
                                    )["planner"]["relabel"]
        assert record["applied"] is applied
        assert record["step_time_s_after"] == pytest.approx(plan.cycle.mean_step_time_s)
        if not applied:
            assert record["step_time_s_before"] == record["step_time_s_after"]
        assert any(line.startswith("Ranks: ") for line in explain_lines(plan)) is applied


# --- what-if, calibration, the commands -----------------------------------------------------

def test_batch_scaling_and_calibration_scale_the_ready_times():
    profile = profile_from_dict(slow_link_profile())
    double = scale_batch(profile, 64)
    assert double.forward_backward_s == 2.0
    assert double.gradient_buckets == (GradientBucket(9000, 0.4), GradientBucket(1000, 2.0))
    placement = {"world_size": 2, "assignment": {l.name: i % 2 for i, l in
                                                 enumerate(profile.layers)},
                 "config": {"factor_update_freq": 1, "inv_update_freq": 1}}
    measured = predicted_phases(profile, placement)
    measured["forward_backward"] = tuple(1.5 * v for v in measured["forward_backward"])
    calibrated, scales = calibrate(profile, placement, measured)
    assert scales["forward_backward"] == pytest.approx(1.5)
    assert [b.ready_s for b in calibrated.gradient_buckets] == pytest.approx(
        [0.2 * scales["forward_backward"], 1.0 * scales["forward_backward"]])


def test_plan_whatif_and_validate_run_on_a_bucketed_profile(tmp_path, capsys):
    doc = synthetic_profile_dict(6, 1, world_size=2)
    grad = sum(l["grad_numel"] for l in doc["layers"]) * 4
    doc = bucketed(doc, [{"bytes": 65536, "ready_s": 0.01},
                         {"bytes": grad - 65536, "ready_s": 0.05}])
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    placement = tmp_path / "placement.json"
    assert run_planner_cli(["plan", "--profile", str(path), "--workers", "2",
                            "--out", str(placement)]) == 0
    assert run_planner_cli(["whatif", "--profile", str(path), "--workers", "1,2,4",
                            "--batch-sizes", "32,64", "--format", "json"]) == 0
    placed = json.loads(placement.read_text())
    profile = load_profile(path)
    predicted = predicted_phases(profile, placed)
    run = tmp_path / "run"
    run.mkdir()
    by_rank = [{f"{p}_s": predicted[p][r] * 1.1 for p in (*PHASES, "step_time")}
               for r in range(2)]
    (run / "summary.json").write_text(json.dumps(
        {"world_size": 2, "mean_step_time_s": by_rank[0]["step_time_s"], "overlap": True,
         "phase_means_by_rank_s": by_rank}))
    out = tmp_path / "calibrated.json"
    capsys.readouterr()
    assert run_planner_cli(["validate", "--placement", str(placement), "--run", str(run),
                            "--calibrate-out", str(out), "--format", "json"]) == 0
    calibrated = load_profile(out)
    scale = calibrated.extra["calibrated"]["scales"]["forward_backward"]
    assert scale == pytest.approx(1.1)
    assert [b.ready_s for b in calibrated.gradient_buckets] == pytest.approx(
        [0.01 * scale, 0.05 * scale])
