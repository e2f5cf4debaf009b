"""Placement documents: making, writing, reading back, rejecting bad ones."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from planner.model.costs import PlanConfig
from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import file_sha256, write_json_atomic
from dpkfac.core.placement import check_placement_matches, load_placement
from planner.placement import make_placement
from dpkfac.core.profile import load_profile
from dpkfac.core.schemas import PLACEMENT_SCHEMA
from dpkfac.core.step import decomposition_numel

from planner_fixtures import write_profile


@pytest.fixture
def profile_path(tmp_path):
    return write_profile(tmp_path, n_layers=9, seed=2)


@pytest.fixture
def placement(profile_path):
    return make_placement(profile=load_profile(profile_path), profile_path=profile_path,
                          workers=3, config=PlanConfig(), time_limit_s=5)


def test_round_trip(tmp_path, placement, profile_path):
    jsonschema.validate(placement, PLACEMENT_SCHEMA)
    out = tmp_path / "placement.json"
    write_json_atomic(out, placement)
    assert load_placement(out) == placement
    assert load_placement(str(out)) == placement
    assert load_placement(placement) == placement
    assert placement["profile"] == {"path": str(profile_path), "sha256": file_sha256(profile_path)}


def test_document_follows_the_contract(placement, profile_path):
    profile = load_profile(profile_path)
    assert placement["schema"] == "dpkfac.placement/1"
    assert placement["world_size"] == 3 and placement["model"] == profile.model
    assert list(placement["assignment"]) == [l.name for l in profile.layers]
    assert placement["config"] == {"factor_update_freq": 1, "inv_update_freq": 1, "overlap": True,
                                   "batch_size": profile.batch_size,
                                   "compute_method": profile.compute_method}
    pred = placement["predicted"]
    assert [w["rank"] for w in pred["per_worker"]] == [0, 1, 2]
    split = placement.get("precondition_split", {})
    for worker in pred["per_worker"]:
        mine = [l for l in profile.layers if placement["assignment"][l.name] == worker["rank"]]
        shares = sum(l.precondition_s * split[l.name][worker["rank"]] / sum(split[l.name])
                     for l in profile.layers if l.name in split)
        expected = shares + sum(l.factor_a_s + l.factor_g_s + l.decompose_a_s + l.decompose_g_s
                                + l.precondition_s * (l.name not in split) for l in mine)
        assert worker["compute_s"] == pytest.approx(expected)
        held_split = sum(decomposition_numel(l.dim_a, l.dim_g, profile.compute_method)
                         * profile.dtype_bytes for l in profile.layers
                         if l.name in split and l not in mine)
        assert worker["memory_bytes"] == sum(l.state_bytes for l in mine) + held_split
    assert pred["lower_bound_s"] <= pred["second_order_s"] <= pred["step_time_s"]
    assert placement["status"] in ("optimal", "feasible", "heuristic")


def test_solver_choice_and_memory_cap_are_recorded(profile_path):
    profile = load_profile(profile_path)
    doc = make_placement(profile=profile, profile_path=profile_path, workers=2,
                         method="round-robin", config=PlanConfig(inv_update_freq=5),
                         memory_cap=10 ** 12)
    assert doc["solver"] == "round-robin" and doc["config"]["inv_update_freq"] == 5
    assert doc["planner"]["memory_cap_bytes"] == 10 ** 12
    assert list(doc["assignment"].values()) == [i % 2 for i in range(9)]


def write(tmp_path, doc, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_wrong_schema_string(tmp_path, placement):
    bad = dict(placement, schema="dpkfac.placement/9")
    with pytest.raises(InputError, match=r"bad\.json.*field schema.*dpkfac\.placement/1"):
        load_placement(write(tmp_path, bad))


def test_rank_out_of_range(tmp_path, placement):
    bad = copy.deepcopy(placement)
    bad["assignment"]["layers.4"] = 3
    with pytest.raises(InputError, match=r"assignment/layers\.4.*rank 3.*world_size 3"):
        load_placement(write(tmp_path, bad))


def test_per_worker_rank_out_of_range(tmp_path, placement):
    bad = copy.deepcopy(placement)
    bad["predicted"]["per_worker"][0]["rank"] = 7
    with pytest.raises(InputError, match=r"per_worker/0/rank"):
        load_placement(write(tmp_path, bad))


@pytest.mark.parametrize("field", ["assignment", "world_size", "predicted", "status"])
def test_missing_field(tmp_path, placement, field):
    bad = {k: v for k, v in placement.items() if k != field}
    with pytest.raises(InputError, match=field):
        load_placement(write(tmp_path, bad))


def test_negative_rank_and_wrong_types(tmp_path, placement):
    bad = copy.deepcopy(placement)
    bad["assignment"]["layers.0"] = -1
    with pytest.raises(InputError, match="assignment/layers.0"):
        load_placement(write(tmp_path, bad))
    with pytest.raises(InputError, match="top level"):
        load_placement(write(tmp_path, [placement]))


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match=r"placement file .*broken\.json.*not valid JSON"):
        load_placement(path)
    with pytest.raises(InputError, match="does not exist"):
        load_placement(tmp_path / "nope.json")


def test_matching_the_model(placement):
    names = list(placement["assignment"])
    check_placement_matches(placement, layer_names=names, world_size=3, source="p.json")
    check_placement_matches(placement, layer_names=names, world_size=None, source="p.json")
    with pytest.raises(InputError, match=r"not in the placement: 'extra'"):
        check_placement_matches(placement, layer_names=names + ["extra"], world_size=3,
                                source="p.json")
    with pytest.raises(InputError, match=r"not in the model: 'layers.0'"):
        check_placement_matches(placement, layer_names=names[1:], world_size=3, source="p.json")
    with pytest.raises(InputError, match=r"p\.json.*world_size.*3 workers.*has 4"):
        check_placement_matches(placement, layer_names=names, world_size=4, source="p.json")
