"""Split preconditioning on the planner's side: the step model with a split against hand
numbers, the split pass, the placement's precondition_split, the lower bound, validate and the
what-if with a split placement. No torch."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from dpkfac.core.cluster import flat_cluster
from dpkfac.core.errors import InputError
from dpkfac.core.placement import load_placement, precondition_split
from dpkfac.core.profile import profile_from_dict
from dpkfac.core.step import ring_allreduce_bytes
from planner.model.calibrate import predicted_phases
from planner.model.costs import PlanConfig, second_order_lower_bound_s
from planner.model.simulate import simulate_cycle
from planner.model.step import placement_split, predict_step
from planner.placement import placement_document
from planner.plan import make_plan
from planner.solve.split import (largest_remainder, refine_rows, row_granule, search_split,
                                 water_fill)
from planner.whatif.baselines import algorithm_cost

from planner_fixtures import run_planner_cli, synthetic_layer, synthetic_profile_dict

COUNTERS = 16  # bytes of numerics counters on each owner's broadcast
SERIAL = PlanConfig(overlap=False)
ALPHA, BETA = 1e-3, 1e-9  # measured at 2 ranks: at 2 ranks both collectives cost a + n b


def hand_profile() -> dict:
    """Three layers with round numbers (factors, decompose, precondition, dim_a, dim_g)."""
    doc = synthetic_profile_dict(3, 0, world_size=2, alpha_s=ALPHA, beta_s_per_byte=BETA,
                                 forward_backward_s=0.1, optimizer_s=0.01)
    costs = [(1.0, 2.0, 4.0, 10, 10), (0.5, 1.0, 0.5, 5, 4), (0.25, 0.5, 0.25, 3, 2)]
    for layer, (factor, decompose, precondition, dim_a, dim_g) in zip(doc["layers"], costs):
        layer.update(factor_a_s=factor, factor_g_s=0.0, decompose_a_s=decompose,
                     decompose_g_s=0.0, precondition_s=precondition, dim_a=dim_a, dim_g=dim_g,
                     grad_numel=dim_a * dim_g)
    return doc


OWNERS = [0, 1, 1]
SPLIT = {0: (4, 6)}  # rank 0 (the owner) 4 of layer 0's 10 rows, rank 1 the other 6
DECOMP_BYTES = 4 * (10 * 10 + 10 + 10 * 10 + 10)  # eigen Q_A, d_A, Q_G, d_G of layer 0


def test_simulated_step_with_a_split_by_hand():
    profile = profile_from_dict(hand_profile())
    config = PlanConfig(inv_update_freq=2, overlap=False)
    update, plain = simulate_cycle(profile, owners=OWNERS, workers=2, config=config,
                                   split=SPLIT).steps
    allreduce = ALPHA + 4 * 126 * BETA                       # the whole gradient, 126 floats
    local = (1.0 + 2.0, 0.75 + 1.5)                          # factors + decompose
    shares = (4.0 * 4 / 10, 0.75 + 4.0 * 6 / 10)             # precondition_s * rows / dim_g
    decomps = ALPHA + (DECOMP_BYTES + COUNTERS) * BETA       # owner 0's split decompositions
    summed = ALPHA + 4 * 100 * BETA                          # the all-reduce of layer 0's grad
    whole = ALPHA + (4 * 26 + COUNTERS) * BETA               # owner 1's broadcast (layers 1, 2)
    second = max(local) + decomps + max(shares) + summed + whole
    assert update.second_order_s == pytest.approx(second)
    assert update.step_time_s == pytest.approx(0.1 + allreduce + second + 0.01)
    assert update.broadcast_s == pytest.approx(decomps + summed + whole)
    assert update.phases_s["precondition"] == pytest.approx(shares)
    assert update.phases_s["broadcast"] == pytest.approx(
        (decomps + shares[1] - shares[0] + summed + whole,
         local[0] - local[1] + decomps + summed + whole))
    # no decomposition (nor its broadcast) on the other step of the cycle
    rank0, rank1 = 1.0 + shares[0], 0.75 + shares[1]
    assert plain.second_order_s == pytest.approx(max(rank0, rank1) + summed + whole)
    assert plain.broadcast_s == pytest.approx(summed + whole)
    kinds = [(s.kind, s.worker) for s in update.critical_path]
    assert kinds == [("forward_backward", 0), ("allreduce", None), ("factors", 0),
                     ("decompose", 0), ("broadcast", None), ("precondition", 1),
                     ("broadcast", None), ("broadcast", None), ("optimizer", 0)]


def test_prediction_compute_memory_and_traffic_with_a_split():
    profile = profile_from_dict(hand_profile())
    config = PlanConfig(inv_update_freq=2, overlap=False)
    pred = predict_step(profile, variant="dp-kfac", owners=OWNERS, workers=2, config=config,
                        split=SPLIT, speeds=[1.0, 2.0])
    assert pred.split == SPLIT
    assert pred.compute_s == pytest.approx((1.0 + 2.0 / 2 + 1.6,
                                            (0.75 + 1.5 / 2 + 0.75 + 2.4) / 2))
    layers = profile.layers
    assert pred.state_bytes == (layers[0].state_bytes,
                                layers[1].state_bytes + layers[2].state_bytes + DECOMP_BYTES)
    traffic = pred.traffic
    assert traffic["gradient_allreduce"] == ring_allreduce_bytes(4 * 127, 2)  # + the loss
    assert traffic["preconditioned_gradient_allreduce"] == ring_allreduce_bytes(400, 2) == 800
    assert traffic["decomposition_broadcast"] == DECOMP_BYTES / 2
    assert traffic["preconditioned_gradient_broadcast"] == 4 * 26  # unsplit layers only
    assert traffic["numerics_counters"] == COUNTERS + COUNTERS / 2  # owner 1 every step, 0 per 2
    assert traffic["factor_allreduce"] == 0
    unsplit = predict_step(profile, variant="dp-kfac", owners=OWNERS, workers=2, config=config)
    assert unsplit.traffic["preconditioned_gradient_broadcast"] == 4 * 126
    assert unsplit.traffic["numerics_counters"] == 2 * COUNTERS
    assert unsplit.traffic["decomposition_broadcast"] == 0


@pytest.mark.parametrize("variant", ["mpd-kfac", "kaisa-comm-opt", "kaisa-mem-opt",
                                     "dp-kfac-round-robin", "sgd"])
def test_other_variants_ignore_the_split(variant):
    profile = profile_from_dict(hand_profile())
    owners = [] if variant == "sgd" else OWNERS
    a, b = (predict_step(profile, variant=variant, owners=owners, workers=2, config=SERIAL,
                         split=split) for split in (SPLIT, None))
    assert a.split == {}
    assert a.step_time_s == b.step_time_s and a.traffic == b.traffic
    assert a.state_bytes == b.state_bytes and a.compute_s == b.compute_s


def test_a_bad_split_is_refused():
    profile = profile_from_dict(hand_profile())
    for split in ({0: (4, 5)}, {0: (10,)}, {7: (1, 1)}):
        with pytest.raises(ValueError):
            predict_step(profile, variant="dp-kfac", owners=OWNERS, workers=2, config=SERIAL,
                         split=split)


def test_water_fill_and_largest_remainder():
    # 3 s of work over loads 0, 1, 5 (speeds 1): level 2, shares 2 and 1 of 3
    assert water_fill(3.0, base_s=[0.0, 1.0, 5.0], speeds=[1, 1, 1]) == pytest.approx(
        [2 / 3, 1 / 3, 0.0])
    # a worker twice as fast takes twice the seconds of work to reach the same level
    assert water_fill(3.0, base_s=[0.0, 0.0], speeds=[1, 2]) == pytest.approx([1 / 3, 2 / 3])
    assert water_fill(0.0, base_s=[1.0, 0.0], speeds=[1, 1]) == pytest.approx([0.5, 0.5])
    assert largest_remainder([2 / 3, 1 / 3, 0.0], 10) == (7, 3, 0)
    assert largest_remainder([0.25] * 4, 10) == (3, 3, 2, 2)
    rows = largest_remainder(water_fill(1.0, base_s=[0.3, 0.1, 0.2, 0.9], speeds=[1, 2, 1, 1]),
                             1024)
    assert sum(rows) == 1024 and rows[3] == 0
    # granules of 8 rows: 1024 = 128 granules, 61.4% -> 79 granules, the odd rows to the largest
    assert largest_remainder([0.614, 0.386], 1024, 8) == (632, 392)
    assert largest_remainder([0.614, 0.386], 1030, 8) == (638, 392)
    assert row_granule(1024, 2) == 8 and row_granule(12, 2) == 1


def test_search_keeps_only_splits_that_pay():
    steps = {(): 1.0, (0,): 0.9, (0, 1): 0.899}  # layer 1 gains 0.1%: not kept
    split, trials = search_split(
        candidates=[0, 1], precondition_s=[2.0, 1.0], dims_g=[8, 8], owners=[0, 0],
        speeds=[1.0, 1.0], compute_of=lambda s: [3.0, 2.0] if s else [5.0, 0.0],
        step_time_of=lambda s: steps[tuple(sorted(s))])
    assert split == {0: (0, 8)}  # without layer 0's 2 s rank 0 still has 3 s: all 8 rows go
    assert [(t.layer, t.rows, t.kept) for t in trials] == [(0, (0, 8), True),
                                                           (1, (4, 4), False)]


def test_a_split_refined_back_onto_its_owner_is_not_kept():
    """The step model may prefer every row back on the owner (a larger all-reduce instead of
    its broadcast); such a "split" moves no work and is not kept, whatever the gain."""
    def step_of(split):
        return 1.0 - 0.001 * split[0][0] if split else 1.0

    split, trials = search_split(  # water-filled to 48/16, refined to 64/0
        candidates=[0], precondition_s=[2.0], dims_g=[64], owners=[0], speeds=[1.0, 1.0],
        compute_of=lambda s: [2.0, 1.0], step_time_of=step_of)
    assert split == {}
    assert [(t.rows, t.kept) for t in trials] == [((64, 0), False)]


def test_refine_rows_moves_granules_while_the_step_drops():
    """The step is least at 40 rows on rank 0; granules of 8 move toward it from either side,
    whichever way the load points, and stop at a split that does not fit."""
    def step_of(split):
        return 1.0 + abs(split[0][0] - 40)

    for start, load in (((16, 48), [1.0, 2.0]), ((16, 48), [2.0, 1.0]), ((64, 0), [3.0, 1.0])):
        split, step_s = refine_rows({0: start}, 0, granule=8, load_s=load, step_time_of=step_of)
        assert split == {0: (40, 24)} and step_s == 1.0
    split, _ = refine_rows({0: (16, 48)}, 0, granule=8, load_s=[1.0, 2.0],
                           step_time_of=step_of, fits=lambda s: s[0][0] <= 24)
    assert split == {0: (24, 40)}
    assert refine_rows({0: (16, 48), 3: (1, 1)}, 0, granule=8, load_s=[1.0, 1.0],
                       step_time_of=step_of)[0] == {0: (16, 48), 3: (1, 1)}  # no load to even


def dominant_profile(**kwargs) -> dict:
    """A 1024 x 1025 Linear among small layers: one owner computes far more than the others."""
    doc = synthetic_profile_dict(6, 1, **kwargs)
    doc["layers"][0] = synthetic_layer("big", dim_a=1025, dim_g=1024)
    for layer in doc["layers"][1:]:
        layer.update(synthetic_layer(layer["name"], dim_a=64, dim_g=64))
    return doc


def _plan(doc, workers, *, split=True, **config):
    return make_plan(profile=profile_from_dict(doc), cluster=flat_cluster(workers=workers,
                                                                         speeds=None),
                     config=PlanConfig(**config), time_limit_s=0.5, split=split)


@pytest.mark.parametrize("workers, inv", [(4, 1), (2, 10), (4, 10)])
def test_a_dominant_layer_is_split_and_the_step_gets_shorter(workers, inv):
    doc = dominant_profile()
    plan = _plan(doc, workers, inv_update_freq=inv)
    whole = _plan(doc, workers, split=False, inv_update_freq=inv)
    assert list(plan.split) == [0] and sum(plan.split[0]) == 1024
    assert plan.prediction.step_time_s < whole.prediction.step_time_s * (1 - 0.005)
    assert plan.prediction.split == plan.split
    assert whole.split == {} and whole.split_trials == ()
    assert plan.lower_bound_s <= plan.prediction.second_order_s
    if inv > 1:  # the staggered prediction runs the split too, its layer in slot 0
        assert plan.staggered.prediction.split == plan.split
        assert plan.staggered.slots[0] == 0


@pytest.mark.parametrize("seed", range(6))
def test_the_split_pass_never_lengthens_the_step(seed):
    rng = random.Random(seed)
    doc = synthetic_profile_dict(rng.randint(2, 12), seed, world_size=rng.choice([2, 4]))
    workers = rng.choice([2, 3, 4, 8])
    plan = _plan(doc, workers, inv_update_freq=rng.choice([1, 4]))
    unsplit = predict_step(plan.profile, variant="dp-kfac", owners=plan.solution.owners,
                           workers=workers, config=plan.config, network=plan.network)
    assert plan.prediction.step_time_s <= unsplit.step_time_s
    if plan.split:
        assert plan.prediction.step_time_s < unsplit.step_time_s * (1 - 0.005)
    assert plan.lower_bound_s <= plan.prediction.second_order_s * (1 + 1e-12)


def test_no_split_on_one_worker():
    plan = _plan(dominant_profile(), 1)
    assert plan.split == {} and plan.split_trials == ()


@pytest.mark.parametrize("seed", range(8))
def test_split_lower_bound_holds_for_any_split_placement(seed):
    rng = random.Random(seed)
    doc = synthetic_profile_dict(rng.randint(1, 8), seed, world_size=rng.choice([1, 2, 4]))
    profile = profile_from_dict(doc)
    workers = rng.choice([2, 3, 5])
    config = PlanConfig(inv_update_freq=rng.choice([1, 3]), overlap=rng.random() < 0.5)
    bound = second_order_lower_bound_s(profile, workers=workers, config=config, split=True)
    assert bound <= second_order_lower_bound_s(profile, workers=workers, config=config)
    for _ in range(5):
        owners = [rng.randrange(workers) for _ in profile.layers]
        split = {}
        for i, layer in enumerate(profile.layers):
            if rng.random() < 0.5:
                cuts = sorted(rng.randint(0, layer.dim_g) for _ in range(workers - 1))
                split[i] = tuple(np.diff([0, *cuts, layer.dim_g]).tolist())
        pred = predict_step(profile, variant="dp-kfac", owners=owners, workers=workers,
                            config=config, split=split, trace=False)
        assert bound <= pred.second_order_s * (1 + 1e-12)


def test_split_bound_is_not_fixed_plus_precondition_over_workers():
    """The owner of a split layer may keep none of its rows: with fixed work 2 s and
    preconditioning 2 s on 2 workers the makespan is 2 s, not 2 + 2 / 2."""
    doc = hand_profile()
    doc["layers"] = doc["layers"][:1]
    doc["layers"][0].update(factor_a_s=0.0, decompose_a_s=2.0, precondition_s=2.0)
    profile = profile_from_dict(doc)
    pred = predict_step(profile, variant="dp-kfac", owners=[0], workers=2, config=SERIAL,
                        split={0: (0, 10)})
    assert max(pred.compute_s) == pytest.approx(2.0)
    bound = second_order_lower_bound_s(profile, workers=2, config=SERIAL, split=True)
    assert bound <= pred.second_order_s


def _written_plan(tmp_path):
    """The dominant profile planned on 4 workers: its plan, placement document, and the
    paths of both files written under tmp_path."""
    doc = dominant_profile()
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(json.dumps(doc))
    plan = _plan(doc, 4, inv_update_freq=10)
    placement = placement_document(plan, profile_path=profile_path)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(placement))
    return plan, placement, profile_path, path


def test_placement_round_trip_and_validate(tmp_path):
    plan, placement, _, path = _written_plan(tmp_path)
    loaded = load_placement(path)
    assert loaded == placement
    dims_g = {layer.name: layer.dim_g for layer in plan.profile.layers}
    assert precondition_split(loaded, dims_g=dims_g) == {"big": plan.split[0]}
    assert placement_split(plan.profile, loaded) == plan.split
    assert loaded["decomposition_step"]["big"] == 0
    pred = loaded["predicted"]
    assert pred["lower_bound_s"] <= pred["second_order_s"] <= pred["step_time_s"]
    assert [w["compute_s"] for w in pred["per_worker"]] == pytest.approx(
        plan.prediction.compute_s)
    assert [w["memory_bytes"] for w in pred["per_worker"]] == list(plan.prediction.state_bytes)
    owner = plan.solution.owners[0]
    decomp = 4 * (1025 * 1025 + 1025 + 1024 * 1024 + 1024)
    for w in pred["per_worker"]:  # every other rank also holds the big layer's decompositions
        mine = [l for l, o in zip(plan.profile.layers, plan.solution.owners) if o == w["rank"]]
        held = sum(l.state_bytes for l in mine) + (0 if w["rank"] == owner else decomp)
        assert w["memory_bytes"] == held
        sent = sum(4 * l.grad_numel for l in mine if l.name != "big")
        assert w["broadcast_bytes"] == sent + (round(decomp / 10) if w["rank"] == owner else 0)
    search = placement["planner"]["split_search"]
    assert search[0]["layer"] == "big" and search[0]["kept"] is True
    # validate predicts from the placement's split: the same step as the plan's
    phases = predicted_phases(plan.profile, loaded)
    assert phases["step_time"][0] == pytest.approx(pred["step_time_s"])
    assert phases["precondition"] == pytest.approx(
        plan.prediction.cycle.mean_phases()["precondition"])
    # a split naming a layer the profile lacks is an input error
    bad = dict(loaded, precondition_split={"nope": [1, 1, 1, 1]},
               assignment=dict(loaded["assignment"], nope=0))
    with pytest.raises(InputError, match="precondition_split"):
        placement_split(plan.profile, bad)


def test_whatif_row_of_a_split_placement_is_its_prediction():
    plan = _plan(dominant_profile(), 4, inv_update_freq=10)
    row = algorithm_cost(plan.profile, algorithm="dp-kfac", workers=4, config=plan.config,
                         owners=plan.solution.owners, split=plan.split)
    assert row.step_time_s == pytest.approx(plan.prediction.step_time_s)
    assert row.comm_bytes_by_kind == plan.prediction.traffic


def test_cli_no_split_writes_no_field_and_the_report_names_the_split(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(dominant_profile()))
    outs = {}
    for name, flags in (("split", ("--explain",)), ("whole", ("--no-split",))):
        out = tmp_path / f"{name}.json"
        assert run_planner_cli(["plan", "--profile", str(profile), "--workers", "4",
                                "--inv-update-freq", "10", "--out", str(out), *flags]) == 0
        outs[name] = (load_placement(out), capsys.readouterr().out)
    (split, report), (whole, whole_report) = outs["split"], outs["whole"]
    assert list(split["precondition_split"]) == ["big"]
    assert "precondition_split" not in whole and whole["planner"]["split_search"] == []
    assert "split preconditioning" in report and "big (rows" in report
    assert "split preconditioning" not in whole_report
    assert "Lower bound with split preconditioning" in report  # --explain
    assert "Split: every worker preconditions its rows of big" in report
    assert split["predicted"]["step_time_s"] < whole["predicted"]["step_time_s"]


def test_library_split_keyword():
    import dpkfac

    doc = dominant_profile()
    assert "precondition_split" in dpkfac.plan(doc, 4, inv_update_freq=10, time_limit_s=0.5)
    assert "precondition_split" not in dpkfac.plan(doc, 4, inv_update_freq=10,
                                                   time_limit_s=0.5, split=False)


def test_validate_command_predicts_with_the_placements_split(tmp_path, capsys):
    plan, _, _, placement_path = _written_plan(tmp_path)
    phases = plan.prediction.cycle.mean_phases()  # the run took exactly the split prediction
    by_rank = [{f"{phase}_s": phases[phase][r] for phase in phases} for r in range(4)]
    for rank in by_rank:
        rank["step_time_s"] = plan.prediction.step_time_s
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "world_size": 4, "mean_step_time_s": plan.prediction.step_time_s, "overlap": True,
        "phase_means_by_rank_s": by_rank}))
    assert run_planner_cli(["validate", "--placement", str(placement_path), "--run", str(run),
                            "--format", "json"]) == 0
    rows = {r["phase"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for phase in ("step_time", "precondition", "broadcast"):
        assert rows[phase]["rel_error"] == pytest.approx(0.0, abs=1e-9)


def test_whatif_placement_row_runs_its_split(tmp_path):
    doc = dominant_profile()
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(json.dumps(doc))
    placement_path = tmp_path / "placement.json"
    assert run_planner_cli(["plan", "--profile", str(profile_path), "--workers", "4",
                            "--inv-update-freq", "10", "--out", str(placement_path)]) == 0
    placement = load_placement(placement_path)
    assert "precondition_split" in placement
    out = tmp_path / "whatif.json"
    assert run_planner_cli(["whatif", "--profile", str(profile_path), "--workers", "2,4",
                            "--inv-update-freq", "10", "--placement", str(placement_path),
                            "--format", "json", "--out", str(out)]) == 0
    rows = {(r["workers"], r["algorithm"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[4, "dp-kfac"]["step_time_s"] == pytest.approx(
        placement["predicted"]["step_time_s"])
    assert rows[4, "dp-kfac"]["comm_preconditioned_gradient_allreduce_bytes"] > 0
    assert rows[2, "dp-kfac"]["comm_preconditioned_gradient_allreduce_bytes"] == 0  # unsplit
