"""The four subcommands as a user runs them: profile -> plan -> train (torchrun, 2 gloo) -> whatif,
and the executor's bad-input paths (one `error:` line, exit 2, no traceback, nothing written)."""
from __future__ import annotations

import json
import os
import math
import subprocess
from pathlib import Path

import pytest
from cli_helpers import run_dpkfac
from executor_fixtures import placement_dict


def _assert_clean_error(result: subprocess.CompletedProcess, *must_contain: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for text in must_contain:
        assert text in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def profile_path(workdir) -> Path:
    path = workdir / "profile.json"
    result = run_dpkfac("profile", "--model", "digits-mlp", "--batch-size", "16", "--out", str(path),
                  "--repeats", "3", "--warmup", "1", torchrun=2)
    assert result.returncode == 0, result.stderr
    return path


def test_profile_under_torchrun_fits_collectives(profile_path):
    doc = json.loads(profile_path.read_text())
    assert doc["schema"] == "dpkfac.profile/1" and doc["measured"] is True
    assert [l["name"] for l in doc["layers"]] == ["1", "3", "5"]
    assert doc["comm"]["world_size"] == 2 and doc["comm"]["source"] == "measured"
    assert doc["comm"]["broadcast"]["beta_s_per_byte"] > 0
    assert all(l["decompose_a_s"] > 0 and l["state_bytes"] > 0 for l in doc["layers"])
    # rank 0 timed its kernels again alone: what the 2 ranks cost each other (2 cores or 200)
    assert doc["contention"]["ranks"] == 2 and 0.3 < doc["contention"]["slowdown"] < 5
    # both ranks on this host's CPUs: the cores they may use
    assert doc["contention"]["cores"] == len(os.sched_getaffinity(0))
    assert 0 < doc["comm"]["gradient_allreduce_cpu_s"] < 1
    if len(doc["step"]["gradient_buckets"]) > 1:  # the step's buckets posted back to back
        assert 0 < doc["comm"]["gradient_buckets_s"] < 1


def test_plan_train_whatif_round_trip(profile_path, workdir):
    placement = workdir / "placement.json"
    result = run_dpkfac("plan", "--profile", str(profile_path), "--workers", "2", "--out", str(placement))
    assert result.returncode == 0, result.stderr
    doc = json.loads(placement.read_text())
    assert sorted(doc["assignment"]) == ["1", "3", "5"] and doc["world_size"] == 2

    run_dir = workdir / "run"
    result = run_dpkfac("train", "--placement", str(placement), "--out", str(run_dir), "--epochs", "1",
                  "--max-steps", "12", "--checkpoint-every", "5", "--no-progress", torchrun=2)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["parameters_identical"] is True
    assert summary["cpu_runtime"]["flush_denormal"] is True  # the CPU speed settings, recorded
    assert summary["cpu_runtime"]["malloc"]["malloc_trim_threshold"] > 0
    owners = set(doc["assignment"].values())
    for rank, memory in enumerate(summary["second_order_memory_bytes"]):
        assert (memory > 0) == (rank in owners)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(12))
    for key in ("loss", "step_time_s", "forward_backward_s", "allreduce_s", "factors_s",
                "decompose_s", "precondition_s", "broadcast_s"):
        assert key in metrics[0]
    assert (run_dir / "checkpoint.pt").is_file()
    _check_model_file(run_dir, summary)

    result = run_dpkfac("whatif", "--profile", str(profile_path), "--workers", "1,2,4", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert {r["algorithm"] for r in rows} >= {"sgd", "dp-kfac"}
    assert {r["workers"] for r in rows} == {1, 2, 4}


def _check_model_file(run_dir: Path, summary: dict) -> None:
    """model.pt loads strictly into a fresh model and gives summary.json's test figures."""
    import torch
    import torch.nn.functional as F

    from executor.workload import load_data
    from executor.workload.models import build_model

    model = build_model("digits-mlp")
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True), strict=True)
    model.eval()
    test = load_data({"spec": "digits"}, model).test
    x, y = test.tensors
    with torch.no_grad():
        output = model(x)
    assert int((output.argmax(dim=1) == y).sum()) / len(y) == summary["test_accuracy"]
    assert float(F.cross_entropy(output, y)) == pytest.approx(summary["test_loss"], rel=1e-5)


def test_profile_unknown_model_is_a_clean_error(tmp_path):
    out = tmp_path / "p.json"
    _assert_clean_error(run_dpkfac("profile", "--model", "no-such-model", "--batch-size", "8",
                             "--out", str(out)), "no-such-model")
    assert not out.exists()


def test_profile_missing_output_folder(tmp_path):
    _assert_clean_error(run_dpkfac("profile", "--model", "digits-mlp", "--batch-size", "8",
                             "--out", str(tmp_path / "nope" / "p.json")), "does not exist")


def test_train_missing_placement(tmp_path):
    _assert_clean_error(run_dpkfac("train", "--placement", str(tmp_path / "missing.json"),
                             "--out", str(tmp_path / "run")), "missing.json")
    assert not (tmp_path / "run").exists()


def test_train_placement_for_other_world_size(tmp_path):
    path = tmp_path / "placement.json"
    names = {"1": 0, "3": 1, "5": 2}
    path.write_text(json.dumps(placement_dict("digits-mlp", names, 3)))
    _assert_clean_error(run_dpkfac("train", "--placement", str(path), "--out", str(tmp_path / "run")),
                        "world_size")
    assert not (tmp_path / "run").exists()


def test_train_placement_for_other_model(tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1)))
    _assert_clean_error(run_dpkfac("train", "--placement", str(path), "--out", str(tmp_path / "run"),
                             "--model", "digits-cnn"), "conv1")
    assert not (tmp_path / "run").exists()


def test_train_resume_without_checkpoint(tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1)))
    _assert_clean_error(run_dpkfac("train", "--placement", str(path), "--out", str(tmp_path / "run"),
                             "--resume"), "checkpoint")


def test_train_resume_continues_exactly(tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1,
                                              inv_update_freq=3)))
    common = ["train", "--placement", str(path), "--epochs", "2", "--no-progress"]
    full = run_dpkfac(*common, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    part = run_dpkfac(*common, "--out", str(tmp_path / "part"), "--max-steps", "50",
                "--checkpoint-every", "25")
    assert part.returncode == 0, part.stderr
    resumed = run_dpkfac(*common, "--out", str(tmp_path / "part"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    want = json.loads((tmp_path / "full" / "summary.json").read_text())
    got = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert got["steps"] == want["steps"]
    assert got["parameter_sha256"] == want["parameter_sha256"]
    # the default cosine spans both --epochs, not --max-steps, and is logged per step
    steps = want["steps"]
    assert want["lr_schedule"] == {"kind": "cosine", "warmup_steps": 0, "horizon_steps": steps}
    rates = [json.loads(line)["lr"] for line in
             (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert rates[0] == pytest.approx(0.1) and rates[-1] < 1e-3 * rates[0]
    assert rates[50] == pytest.approx(0.05 * (1 + math.cos(math.pi * 50 / steps)))
    longer = run_dpkfac(*common[:3], "--epochs", "3", "--no-progress",
                        "--out", str(tmp_path / "part"), "--resume")
    _assert_clean_error(longer, "lr_schedule")


@pytest.mark.parametrize("flags, message", [
    (("--link-rate", "fast"), "--link-rate"),
    (("--link-burst", "62500"), "--link-burst needs --link-rate"),
    (("--link-rate", "100mbit", "--link-burst", "lots"), "--link-burst"),
])
def test_profile_bad_link_flags_are_a_clean_error(tmp_path, flags, message):
    out = tmp_path / "p.json"
    result = run_dpkfac("profile", "--model", "digits-mlp", "--batch-size", "8", "--out",
                        str(out), *flags)
    _assert_clean_error(result, message)
    assert not out.exists()
