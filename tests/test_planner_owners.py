"""The owner search: fewer owners when broadcasts cost more than the compute they spread."""
from __future__ import annotations

import json

import pytest

from planner.model.costs import PlanConfig, layer_state_bytes
from planner.solve.owners import fastest_ranks, owner_counts
from planner.placement import make_placement
from dpkfac.core.profile import profile_from_dict
from planner.model.simulate import simulate_cycle
from planner.whatif.sweep import Sweep, sweep_rows

from planner_fixtures import run_planner_cli, synthetic_profile_dict

FREQ1 = PlanConfig()


def test_owner_counts_halve_from_the_most_useful_count():
    assert owner_counts(workers=8, layers=20) == (8, 4, 2, 1)
    assert owner_counts(workers=64, layers=5) == (5, 2, 1)
    assert owner_counts(workers=6, layers=6) == (6, 3, 1)
    assert owner_counts(workers=1, layers=9) == (1,)


def test_fastest_ranks_prefers_speed_then_the_lower_rank():
    assert fastest_ranks([1.0, 2.0, 2.0, 0.5], 2) == (1, 2)
    assert fastest_ranks([1.0, 1.0, 1.0], 2) == (0, 1)


def _placements(doc: dict, workers: int, **kwargs) -> tuple[dict, dict, object]:
    profile = profile_from_dict(doc)
    path_free = dict(profile_path=__file__, workers=workers, config=FREQ1, time_limit_s=2.0)
    auto = make_placement(profile=profile, owners="auto", **path_free, **kwargs)
    every = make_placement(profile=profile, owners="all", **path_free, **kwargs)
    return auto, every, profile


def _owners(placement: dict) -> set[int]:
    return set(placement["assignment"].values())


def test_costly_broadcasts_put_the_layers_on_fewer_owners():
    # 12 small layers, a 20 ms per-hop broadcast latency at 16 ranks: each owner's broadcast
    # costs 15 x 20 ms, far more than the compute spreading saves
    doc = synthetic_profile_dict(12, 3, world_size=2, alpha_s=0.02)
    auto, every, profile = _placements(doc, 16)
    assert len(_owners(every)) == 12
    assert len(_owners(auto)) < len(_owners(every))
    assert auto["predicted"]["step_time_s"] < every["predicted"]["step_time_s"]
    # the recorded search says what it tried and what each count predicted
    trials = {t["owners"]: t["step_time_s"] for t in auto["planner"]["owner_search"]}
    assert set(trials) == {12, 6, 3, 1}
    assert auto["planner"]["owners"] == len(_owners(auto))
    assert trials[auto["planner"]["owners"]] == pytest.approx(auto["predicted"]["step_time_s"])
    assert auto["status"] == "heuristic"
    # the prediction is the simulation of exactly that placement
    owners = [auto["assignment"][layer.name] for layer in profile.layers]
    cycle = simulate_cycle(profile, owners=owners, workers=16, config=FREQ1)
    assert cycle.mean_step_time_s == pytest.approx(auto["predicted"]["step_time_s"])


def test_cheap_broadcasts_keep_every_owner():
    doc = synthetic_profile_dict(12, 3, world_size=2, alpha_s=1e-9, beta_s_per_byte=1e-15)
    auto, every, _ = _placements(doc, 4)
    assert auto["assignment"] == every["assignment"]
    assert len(_owners(auto)) == 4


def test_fewer_owners_never_break_a_memory_cap():
    doc = synthetic_profile_dict(12, 3, world_size=2, alpha_s=0.02)
    state = layer_state_bytes(profile_from_dict(doc))
    cap = 3 * max(state)  # at least 4 owners needed for 12 layers
    auto, _, _ = _placements(doc, 16, memory_cap=cap)
    per_owner = {}
    for name, owner in auto["assignment"].items():
        per_owner[owner] = per_owner.get(owner, 0) + next(
            l["state_bytes"] for l in doc["layers"] if l["name"] == name)
    assert max(per_owner.values()) <= cap
    trials = {t["owners"]: t["step_time_s"] for t in auto["planner"]["owner_search"]}
    assert trials[1] is None  # one owner cannot hold it all: recorded as not possible


def test_plan_command_owners_flag(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(synthetic_profile_dict(12, 3, world_size=2, alpha_s=0.02)))
    for mode in ("auto", "all"):
        out = tmp_path / f"{mode}.json"
        assert run_planner_cli(["plan", "--profile", str(path), "--workers", "16", "--out",
                                str(out), "--owners", mode]) == 0
    auto, every = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("auto", "all"))
    assert auto["planner"]["owners"] < every["planner"]["owners"] == 12
    assert every["planner"]["owner_search"] == []


def test_whatif_planned_dp_kfac_is_never_slower_than_round_robin_at_scale():
    profile = profile_from_dict(synthetic_profile_dict(20, 5, world_size=8, alpha_s=2e-4))
    rows = sweep_rows(profile, Sweep(workers=(64, 1024)))
    by = {(r["workers"], r["algorithm"]): r["step_time_s"] for r in rows}
    for workers in (64, 1024):
        assert by[(workers, "dp-kfac")] <= by[(workers, "dp-kfac-round-robin")] * (1 + 1e-9)
    # at 1024 ranks one broadcast per layer costs more than the layers' compute spread
    assert by[(1024, "dp-kfac")] < 0.9 * by[(1024, "dp-kfac-round-robin")]


def test_explain_and_compare_follow_the_owner_search():
    from dpkfac.core.cluster import flat_cluster
    from planner.report.compare import compare_rows
    from planner.report.explain import explain_lines
    from planner.plan import make_plan

    profile = profile_from_dict(synthetic_profile_dict(12, 3, world_size=2, alpha_s=0.02))
    cluster = flat_cluster(workers=16, speeds=None)
    plan = make_plan(profile=profile, cluster=cluster, config=FREQ1, time_limit_s=2.0)
    chosen = len(set(plan.solution.owners))
    assert chosen < 12 and plan.owner_trials[0].owners == 12
    assert any(line.startswith(f"Why: the owner search placed the layers on {chosen} of 12")
               for line in explain_lines(plan))
    rows = {mode: {r["solver"]: r for r in compare_rows(
        profile=profile, cluster=cluster, config=FREQ1, memory_cap=None, time_limit_s=2.0,
        ilp_max_binaries=None, owners=mode)} for mode in ("auto", "all")}
    assert rows["auto"]["best"]["step_time_s"] == pytest.approx(plan.cycle.mean_step_time_s)
    assert rows["all"]["best"]["step_time_s"] > rows["auto"]["best"]["step_time_s"]
    with pytest.raises(ValueError):
        make_plan(profile=profile, cluster=cluster, config=FREQ1, owners="some")
