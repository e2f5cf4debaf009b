"""Cost model and baseline algorithms: hand-computed examples and monotonicity."""
from __future__ import annotations

import copy
import random

import pytest

from dpkfac.core.errors import InputError
from dpkfac.core.profile import AlphaBeta, profile_from_dict
from planner.model import network as comm
from planner.model.costs import (PlanConfig, broadcast_lower_bound_s, decomposition_bytes,
                                 factor_bytes, layer_work_s, second_order_lower_bound_s)
from planner.model.step import predict_step
from planner.solve.solvers import solve
from planner.whatif.baselines import ALGORITHMS, algorithm_cost
from planner.whatif.sweep import ROW_KEYS, Sweep, sweep_rows

from planner_fixtures import synthetic_profile_dict

FREQ1 = PlanConfig(overlap=False)  # the serial step (by hand); tests/test_overlapped_schedule.py
COUNTERS = 16  # bytes of numerics counters at the end of each owner's broadcast


def predict(profile, *, owners, workers, config, speeds=None, variant="dp-kfac"):
    return predict_step(profile, variant=variant, owners=owners, workers=workers, config=config,
                        speeds=speeds)


def whatif_rows(profile, *, workers, config):
    return sweep_rows(profile, Sweep(workers=tuple(workers),
                                     factor_update_freqs=(config.factor_update_freq,),
                                     inv_update_freqs=(config.inv_update_freq,)))


def two_layer_profile(*, world_size: int = 2, alpha: float = 1e-3, beta: float = 1e-9) -> dict:
    doc = synthetic_profile_dict(2, 0, world_size=world_size, alpha_s=alpha, beta_s_per_byte=beta,
                                 forward_backward_s=0.1, optimizer_s=0.01)
    doc["layers"][0].update(dim_a=10, dim_g=20, grad_numel=200, factor_a_s=1.0, factor_g_s=2.0,
                            decompose_a_s=3.0, decompose_g_s=4.0, precondition_s=5.0,
                            state_bytes=1000)
    doc["layers"][1].update(dim_a=30, dim_g=40, grad_numel=1200, factor_a_s=0.1, factor_g_s=0.2,
                            decompose_a_s=0.3, decompose_g_s=0.4, precondition_s=0.5,
                            state_bytes=3000)
    return doc


def test_compute_is_the_contracts_sum_at_frequency_one():
    profile = profile_from_dict(two_layer_profile())
    pred = predict(profile, owners=(0, 1), workers=2, config=FREQ1)
    assert pred.compute_s == pytest.approx((15.0, 1.5))
    together = predict(profile, owners=(1, 1), workers=2, config=FREQ1)
    assert together.compute_s == pytest.approx((0.0, 16.5))


def test_worker_speed_scales_compute():
    profile = profile_from_dict(two_layer_profile())
    pred = predict(profile, owners=(0, 1), workers=2, config=FREQ1, speeds=(2.0, 0.5))
    assert pred.compute_s == pytest.approx((7.5, 3.0))


def test_update_frequencies_amortise_factors_and_decompositions():
    profile = profile_from_dict(two_layer_profile())
    config = PlanConfig(factor_update_freq=3, inv_update_freq=7)
    assert layer_work_s(profile.layers[0], config=config) == pytest.approx(3 / 3 + 7 / 7 + 5)
    pred = predict(profile, owners=(0, 0), workers=1, config=config)
    assert pred.second_order_s == pytest.approx(3 / 3 + 7 / 7 + 5 + 0.3 / 3 + 0.7 / 7 + 0.5)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_frequency_is_an_input_error(bad):
    with pytest.raises(InputError, match="freq"):
        PlanConfig(factor_update_freq=bad)


def test_step_time_adds_up_by_hand():
    profile = profile_from_dict(two_layer_profile(world_size=2, alpha=1e-3, beta=1e-9))
    pred = predict(profile, owners=(0, 1), workers=2, config=FREQ1)
    # Measured at 2 ranks: broadcast = 1 hop, all-reduce = 2(p-1)/p = 1 pass: the measured line.
    grad0, grad1 = 200 * 4, 1200 * 4
    broadcast = (1e-3 + (grad0 + COUNTERS) * 1e-9) + (1e-3 + (grad1 + COUNTERS) * 1e-9)
    allreduce = 1e-3 + (grad0 + grad1) * 1e-9
    step = pred.cycle.steps[0]
    assert step.broadcast_s == pytest.approx(broadcast)
    assert step.allreduce_s == pytest.approx(allreduce)
    assert pred.second_order_s == pytest.approx(15.0 + broadcast)
    assert pred.step_time_s == pytest.approx(0.1 + allreduce + 15.0 + broadcast + 0.01)
    assert pred.state_bytes == (1000, 3000)
    # ring all-reduce at p=2 of the gradient and the loss: n sent + n received; broadcasts:
    # every layer's gradient once (sent or received) and each owner's counters
    assert pred.traffic["gradient_allreduce"] == 2 * (grad0 + grad1 + 4)
    assert pred.comm_bytes_per_step == 2 * (grad0 + grad1 + 4) + grad0 + grad1 + 2 * COUNTERS


def test_one_owner_makes_one_fused_broadcast():
    profile = profile_from_dict(two_layer_profile(world_size=2, alpha=1e-3, beta=1e-9))
    pred = predict(profile, owners=(1, 1), workers=2, config=FREQ1)
    assert pred.cycle.steps[0].broadcast_s == pytest.approx(1e-3 + (1400 * 4 + COUNTERS) * 1e-9)
    assert pred.traffic["preconditioned_gradient_broadcast"] == 5600
    assert pred.traffic["numerics_counters"] == COUNTERS


def network(measured: AlphaBeta, *, measured_ranks: int) -> comm.Network:
    return comm.Network(broadcast_hop=comm.broadcast_per_hop(measured, measured_ranks=measured_ranks),
                        allreduce_hop=comm.allreduce_per_hop(measured, measured_ranks=measured_ranks),
                        measured_ranks=measured_ranks)


def test_rescaling_from_the_measured_world_size():
    measured = AlphaBeta(alpha_s=6e-4, beta_s_per_byte=3e-10)
    n = 1e6
    at4, at1 = network(measured, measured_ranks=4), network(measured, measured_ranks=1)
    # at the measured size the measured line comes back
    assert at4.broadcast_s(ranks=4, nbytes=n) == pytest.approx(
        6e-4 + n * 3e-10)
    assert at4.allreduce_s(ranks=4, nbytes=n) == pytest.approx(
        6e-4 + n * 3e-10)
    # broadcast: alpha' = 2e-4, beta' = 3e-10; at 8 ranks 7 alpha' + n beta'
    assert at4.broadcast_s(ranks=8, nbytes=n) == pytest.approx(
        7 * 2e-4 + n * 3e-10)
    # ring all-reduce at 4: 6 alpha' = 6e-4, 1.5 beta' = 3e-10 -> alpha' 1e-4, beta' 2e-10
    assert at4.allreduce_s(ranks=8, nbytes=n) == pytest.approx(
        14 * 1e-4 + 2 * 7 / 8 * n * 2e-10)
    # measured alone: taken as per-hop values
    assert at1.allreduce_s(ranks=3, nbytes=n) == pytest.approx(
        4 * 6e-4 + 4 / 3 * n * 3e-10)
    assert at1.broadcast_s(ranks=3, nbytes=n) == pytest.approx(
        2 * 6e-4 + n * 3e-10)


def test_no_communication_at_one_worker():
    profile = profile_from_dict(synthetic_profile_dict(6, 1, world_size=8))
    pred = predict(profile, owners=(0,) * 6, workers=1, config=FREQ1)
    step = pred.cycle.steps[0]
    assert step.allreduce_s == 0 and step.broadcast_s == 0 and pred.comm_bytes_per_step == 0
    for name in ALGORITHMS:
        cost = algorithm_cost(profile, algorithm=name, workers=1, config=FREQ1)
        assert cost.comm_bytes_per_step == 0, name


def scaled_comm(doc: dict, factor: float) -> dict:
    doc = copy.deepcopy(doc)
    for op in ("allreduce", "broadcast"):
        doc["comm"][op]["beta_s_per_byte"] *= factor
        doc["comm"][op]["alpha_s"] *= factor
    return doc


@pytest.mark.parametrize("seed", range(5))
def test_more_bandwidth_is_never_slower(seed):
    rng = random.Random(seed)
    doc = synthetic_profile_dict(10, seed, world_size=rng.choice([1, 2, 4, 8]))
    slow, fast = profile_from_dict(doc), profile_from_dict(scaled_comm(doc, 0.25))
    for workers in (1, 2, 3, 16):
        owners = [rng.randrange(workers) for _ in range(10)]
        assert (predict(fast, owners=owners, workers=workers, config=FREQ1).step_time_s
                <= predict(slow, owners=owners, workers=workers, config=FREQ1).step_time_s)
        slow_rows = whatif_rows(slow, workers=[workers], config=FREQ1)
        fast_rows = whatif_rows(fast, workers=[workers], config=FREQ1)
        for a, b in zip(fast_rows, slow_rows):
            assert a["step_time_s"] <= b["step_time_s"] * (1 + 1e-12), a["algorithm"]


@pytest.mark.parametrize("seed", range(5))
def test_lower_bound_holds_for_any_placement(seed):
    rng = random.Random(seed)
    profile = profile_from_dict(synthetic_profile_dict(9, seed))
    config = PlanConfig(factor_update_freq=rng.randint(1, 4), inv_update_freq=rng.randint(1, 9))
    for workers in (1, 2, 5, 12):
        bound = second_order_lower_bound_s(profile, workers=workers, config=config)
        assert bound >= broadcast_lower_bound_s(profile, workers=workers)
        for _ in range(20):
            owners = [rng.randrange(workers) for _ in range(9)]
            pred = predict(profile, owners=owners, workers=workers, config=config)
            assert bound <= pred.second_order_s * (1 + 1e-12)


def test_baseline_byte_counts():
    profile = profile_from_dict(two_layer_profile())
    layer = profile.layers[0]
    assert factor_bytes(layer, dtype_bytes=4) == 4 * (100 + 400)
    assert decomposition_bytes(layer, dtype_bytes=4, compute_method="eigen") == 4 * (110 + 420)
    assert decomposition_bytes(layer, dtype_bytes=4, compute_method="inverse") == 4 * 500


def test_all_kfac_variants_agree_on_one_worker():
    doc = synthetic_profile_dict(7, 2)
    for layer in doc["layers"]:  # make state_bytes the baselines' factors + eigen decompositions
        a, g = layer["dim_a"], layer["dim_g"]
        layer["state_bytes"] = 4 * (2 * a * a + a + 2 * g * g + g)
    profile = profile_from_dict(doc)
    rows = whatif_rows(profile, workers=[1], config=FREQ1)
    kfac = [r for r in rows if r["algorithm"] != "sgd"]
    assert len({round(r["step_time_s"], 12) for r in kfac}) == 1
    assert len({r["memory_bytes_per_worker"] for r in kfac}) == 1


def test_whatif_rows_shape_and_orderings():
    profile = profile_from_dict(synthetic_profile_dict(12, 4))
    rows = whatif_rows(profile, workers=[1, 2, 8], config=FREQ1)
    assert len(rows) == 3 * len(ALGORITHMS)
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    for p in (2, 8):
        by = {r["algorithm"]: r for r in rows if r["workers"] == p}
        assert by["dp-kfac"]["step_time_s"] <= by["dp-kfac-round-robin"]["step_time_s"] + 1e-12
        assert by["dp-kfac"]["comm_bytes_per_step"] < by["mpd-kfac"]["comm_bytes_per_step"]
        assert by["dp-kfac"]["memory_bytes_per_worker"] < by["kaisa-comm-opt"][
            "memory_bytes_per_worker"]
        assert by["sgd"]["second_order_s"] == 0
        assert (by["kaisa-comm-opt"]["memory_bytes_per_worker"]
                >= by["mpd-kfac"]["memory_bytes_per_worker"])


def test_dp_kfac_cost_uses_the_given_placement():
    profile = profile_from_dict(synthetic_profile_dict(6, 3))
    owners = solve("greedy", work=[l.decompose_s for l in profile.layers], workers=3).owners
    cost = algorithm_cost(profile, algorithm="dp-kfac", workers=3, config=FREQ1, owners=owners)
    pred = predict(profile, owners=owners, workers=3, config=FREQ1)
    assert cost.step_time_s == pred.step_time_s
    assert cost.memory_bytes_per_worker == profile.model_grad_bytes + max(pred.state_bytes)


def test_whatif_sweep_is_fast():
    import time
    profile = profile_from_dict(synthetic_profile_dict(25, 1))
    start = time.perf_counter()
    whatif_rows(profile, workers=[1, 2, 4, 8, 16, 32, 64], config=FREQ1)
    assert time.perf_counter() - start < 6.0


def with_measured_points(doc: dict, sizes: list[int], allreduce: list[float],
                         broadcast: list[float]) -> dict:
    doc = copy.deepcopy(doc)
    doc["comm"]["message_bytes"] = sizes
    doc["comm"]["allreduce"]["seconds"] = allreduce
    doc["comm"]["broadcast"]["seconds"] = broadcast
    return doc


# a gloo-like curve: flat up to 4 KiB, a step at 16 KiB, then bandwidth-bound
SIZES = [1024, 4096, 16384, 65536, 262144]
STEPPED = [5e-4, 5e-4, 2e-3, 2.1e-3, 2.4e-3]


def test_measured_points_are_used_at_the_measured_rank_count():
    doc = with_measured_points(two_layer_profile(world_size=2, alpha=1e-3, beta=1e-9), SIZES,
                               STEPPED, STEPPED)
    net = comm.network_from_profile(profile_from_dict(doc).comm)
    assert net.allreduce_s(ranks=2, nbytes=16384) == pytest.approx(2e-3)
    assert net.broadcast_s(ranks=2, nbytes=40960) == pytest.approx(2.05e-3)  # halfway
    assert net.broadcast_s(ranks=2, nbytes=10) == pytest.approx(5e-4)  # below: smallest size
    # beyond the largest size: the fit's seconds per byte (at 2 ranks the measured line)
    assert net.broadcast_s(ranks=2, nbytes=262144 + 1e6) == pytest.approx(2.4e-3 + 1e6 * 1e-9)
    assert net.allreduce_s(ranks=1, nbytes=16384) == 0.0


def test_measured_points_are_rescaled_to_other_rank_counts():
    doc = with_measured_points(two_layer_profile(world_size=2, alpha=1e-3, beta=1e-9), SIZES,
                               STEPPED, STEPPED)
    shaped = comm.network_from_profile(profile_from_dict(doc).comm)
    plain = comm.network_from_profile(profile_from_dict(two_layer_profile(
        world_size=2, alpha=1e-3, beta=1e-9)).comm)
    for ranks in (3, 8, 64):
        for n in (4096, 65536):
            ratio = plain.broadcast_s(ranks=ranks, nbytes=n) / plain.broadcast_s(ranks=2, nbytes=n)
            assert shaped.broadcast_s(ranks=ranks, nbytes=n) == pytest.approx(
                shaped.broadcast_s(ranks=2, nbytes=n) * ratio)


def test_measured_points_keep_the_broadcast_bound_valid():
    """The stepped curve is not additive (two 8 KiB broadcasts cost less than one of 16 KiB):
    the bound must stay below every placement's broadcasts."""
    doc = two_layer_profile(world_size=2, alpha=1e-3, beta=1e-9)
    for layer in doc["layers"]:
        layer["grad_numel"] = 2048  # 8 KiB each
    steep = [5e-4, 5e-4, 4e-3, 4.1e-3, 4.4e-3]
    doc = with_measured_points(doc, SIZES, steep, steep)
    profile = profile_from_dict(doc)
    split = predict(profile, owners=(0, 1), workers=2, config=FREQ1).cycle.steps[0].broadcast_s
    together = predict(profile, owners=(0, 0), workers=2, config=FREQ1).cycle.steps[0].broadcast_s
    assert split < together  # the curve really is not additive here
    for workers in (2, 5):
        bound = broadcast_lower_bound_s(profile, workers=workers)
        for owners in ((0, 0), (0, 1), (1, workers - 1)):
            assert bound <= predict(profile, owners=owners, workers=workers,
                                    config=FREQ1).cycle.steps[0].broadcast_s * (1 + 1e-12)


def test_measured_points_round_trip_and_mismatch_is_an_input_error():
    from dpkfac.core.profile import profile_to_dict

    doc = with_measured_points(two_layer_profile(), SIZES, STEPPED, STEPPED)
    doc["comm"]["source"] = "measured"
    doc["comm"]["allreduce"]["fit_mean_rel_error"] = 0.37
    doc["comm"]["broadcast"]["root_seconds"] = [2e-4] * len(SIZES)
    again = profile_to_dict(profile_from_dict(doc))
    assert again["comm"] == doc["comm"]
    doc["comm"]["broadcast"]["root_seconds"] = [2e-4]
    with pytest.raises(InputError, match="comm.broadcast.root_seconds"):
        profile_from_dict(doc)
    bad = with_measured_points(two_layer_profile(), SIZES, STEPPED[:-1], STEPPED)
    with pytest.raises(InputError, match="comm.allreduce.seconds"):
        profile_from_dict(bad)
    unsorted = with_measured_points(two_layer_profile(), SIZES[::-1], STEPPED, STEPPED)
    with pytest.raises(InputError, match="ascending"):
        profile_from_dict(unsorted)
