"""`import dpkfac`: the in-process planner (pure, no torch) and the preconditioner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpkfac
from dpkfac.core.errors import InputError
from dpkfac.core.placement import load_placement

from planner_fixtures import run_planner_cli

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "digits-cnn.b32.cpu2-gloo.json"


def test_plan_in_process_equals_the_command(tmp_path):
    out = tmp_path / "placement.json"
    assert run_planner_cli(["plan", "--profile", str(PROFILE), "--workers", "2", "--out",
                            str(out), "--memory-cap", "4MiB"]) == 0
    command = json.loads(out.read_text())
    placement = dpkfac.plan(json.loads(PROFILE.read_text()), 2, memory_cap="4MiB")
    load_placement(placement)  # a valid dpkfac.placement/1 document
    assert placement["assignment"] == command["assignment"]
    for key in ("step_time_s", "second_order_s", "comm_bytes_per_step", "lower_bound_s"):
        assert placement["predicted"][key] == command["predicted"][key], key
    assert placement["profile"]["path"] == "<in memory>"
    from_file = dpkfac.plan(PROFILE, 2, memory_cap=4 << 20)
    assert from_file["profile"] == command["profile"] | {"path": str(PROFILE)}


def test_plan_takes_a_cluster_document_and_update_periods():
    cluster = {"schema": "dpkfac.cluster/1", "nodes": 2, "gpus_per_node": 2,
               "intra_node": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5},
               "inter_node": {"bandwidth_bytes_per_s": 1e9, "latency_s": 1e-4}}
    placement = dpkfac.plan(PROFILE, cluster=cluster, inv_update_freq=10)
    assert placement["world_size"] == 4 and placement["config"]["inv_update_freq"] == 10
    assert placement["planner"]["network"] == "cluster"


@pytest.mark.parametrize("call, message", [
    (lambda: dpkfac.plan(42, 2), "profile"),
    (lambda: dpkfac.plan(PROFILE), "--workers"),
    (lambda: dpkfac.plan({"schema": "dpkfac.profile/1"}, 2), "field"),
    (lambda: dpkfac.plan(PROFILE, 2, memory_cap="lots"), "memory_cap"),
])
def test_plan_bad_input_is_an_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_plan_needs_no_torch(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "torch.py").write_text("raise ImportError('torch is made unimportable')\n")
    code = ("import sys, dpkfac; p = dpkfac.plan(sys.argv[1], 3); "
            "assert 'torch' not in sys.modules; print(len(set(p['assignment'].values())))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked), str(ROOT)]))
    result = subprocess.run([sys.executable, "-c", code, str(PROFILE)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 1 <= int(result.stdout) <= 3


def test_dpkfac_gives_the_executors_preconditioner():
    from executor import DPKFAC

    assert dpkfac.DPKFAC is DPKFAC
    with pytest.raises(AttributeError):
        dpkfac.no_such_thing  # noqa: B018


def _profile_and_plan_in_a_group(rank: int, world_size: int) -> tuple[dict, dict]:
    import torch

    from executor_fixtures import small_cnn

    torch.manual_seed(0)
    model = small_cnn()
    gen = torch.Generator().manual_seed(rank)  # each rank its own batch, as in training
    batch = (torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    doc = dpkfac.profile(model, batch, name="tests:small_cnn",
                         warmup=0, repeats=3, factor_batches=2)
    return doc, dpkfac.plan_for_group(doc, time_limit_s=2.0)


def test_profile_and_plan_for_group_under_two_processes():
    """Every rank calls dpkfac.profile (collectives measured over the group) and
    dpkfac.plan_for_group: both ranks hold the same profile and the same placement."""
    from distributed_helpers import run_distributed

    (doc0, plan0), (doc1, plan1) = run_distributed(_profile_and_plan_in_a_group, 2)
    assert doc0 == doc1 and plan0 == plan1
    assert doc0["comm"]["world_size"] == 2 and doc0["comm"]["source"] == "measured"
    assert plan0["world_size"] == 2 and plan0["model"] == "tests:small_cnn"
    assert plan0["data"]["spec"] == "in-process" and plan0["loss"] == "cross-entropy"
    load_placement(plan0)


def test_plan_for_group_without_a_group_is_plan():
    doc = json.loads(PROFILE.read_text())
    assert dpkfac.plan_for_group(doc, workers=2)["assignment"] == \
        dpkfac.plan(doc, 2)["assignment"]
    with pytest.raises(InputError, match="memory"):
        dpkfac.plan_for_group(doc, workers=2, memory_cap=1)


@pytest.mark.parametrize("options, message", [
    ({"rounds": 3}, "unknown option"),
    ({"repeats": 2}, "repeats must be >= 3"),
    ({"link_burst_s": 0.005}, "link_burst_s needs link_bytes_per_s"),
    ({"link_burst_s": -0.005, "link_bytes_per_s": 1e7}, "link_burst_s must be >= 0"),
])
def test_profile_bad_options_are_input_errors(options, message):
    import torch
    from executor_fixtures import small_cnn

    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    with pytest.raises(InputError, match=message):
        dpkfac.profile(small_cnn(), batch, **options)
