"""The layering holds: training needs no solver stack, planning needs no torch, the core imports
neither side, and the placement, the what-if row and a measured run agree on one step."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_dpkfac

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "digits-cnn.b32.cpu2-gloo.json"
SOLVER_STACK = ("pulp", "highspy", "networkx", "matplotlib")


def _blocked_env(tmp_path: Path, modules: tuple[str, ...]) -> dict:
    """An environment in which importing any of `modules` fails: a folder of stand-ins that
    raise ImportError comes first on PYTHONPATH (inherited by torchrun's workers)."""
    folder = tmp_path / "blocked"
    folder.mkdir()
    for name in modules:
        (folder / f"{name}.py").write_text(
            f"raise ImportError('{name} is made unimportable by the test')\n")
    path = os.pathsep.join([str(folder), str(ROOT)])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _imports(package: Path) -> set[str]:
    """Top-level names of every module imported anywhere under `package` (absolute imports)."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_core_imports_neither_side_nor_torch_nor_solvers():
    assert not _imports(ROOT / "dpkfac" / "core") & {"planner", "executor", "torch",
                                                       *SOLVER_STACK}


def test_executor_imports_no_planner_and_planner_no_torch():
    assert not _imports(ROOT / "executor") & {"planner", *SOLVER_STACK}
    assert not _imports(ROOT / "planner") & {"executor", "torch"}


@pytest.fixture(scope="module")
def placement(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layering") / "placement.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_dpkfac("plan", "--profile", str(PROFILE), "--workers", "2", "--out", str(out),
                     env=env)
    assert result.returncode == 0, result.stderr
    return out


def test_train_runs_without_the_solver_stack(placement, tmp_path):
    env = _blocked_env(tmp_path, SOLVER_STACK)
    probe = subprocess.run([sys.executable, "-c", "import networkx"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "unimportable" in probe.stderr
    run = tmp_path / "run"
    result = run_dpkfac("train", "--placement", str(placement), "--out", str(run), "--max-steps",
                     "3", env=env, torchrun=2)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["parameters_identical"]


def test_plan_whatif_and_validate_run_without_torch(placement, tmp_path):
    env = _blocked_env(tmp_path, ("torch",))
    out = tmp_path / "placement.json"
    assert run_dpkfac("plan", "--profile", str(PROFILE), "--workers", "3", "--out", str(out),
                   env=env).returncode == 0
    result = run_dpkfac("whatif", "--profile", str(PROFILE), "--workers", "1,2,4",
                     "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["rows"]) == 3 * 6
    missing = run_dpkfac("validate", "--placement", str(out), "--run", str(tmp_path / "none"),
                      env=env)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error:")


def test_placement_whatif_and_a_measured_run_agree_on_the_step(placement, tmp_path):
    """Same profile, 2 workers: the placement's predicted bytes per step, the what-if dp-kfac row
    and a measured run agree to the byte; the placement's and the row's seconds are equal."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    doc = json.loads(placement.read_text())
    result = run_dpkfac("whatif", "--profile", str(PROFILE), "--workers", "2", "--format", "json",
                     env=env)
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout)["rows"] if r["algorithm"] == "dp-kfac")
    predicted = doc["predicted"]
    assert row["step_time_s"] == predicted["step_time_s"]
    assert row["second_order_s"] == predicted["second_order_s"]
    assert row["comm_bytes_per_step"] == predicted["comm_bytes_per_step"]
    run = tmp_path / "run"
    trained = run_dpkfac("train", "--placement", str(placement), "--out", str(run), "--max-steps",
                      "4", env=env, torchrun=2)
    assert trained.returncode == 0, trained.stderr
    measured = json.loads((run / "summary.json").read_text())["comm_bytes_per_step"]
    assert measured["total"] == predicted["comm_bytes_per_step"] == row["comm_bytes_per_step"]
    for kind, nbytes in predicted["comm_bytes_by_kind"].items():
        assert measured[kind] == nbytes, kind
        assert row[f"comm_{kind}_bytes"] == nbytes, kind


def test_whatif_of_a_placement_is_that_placements_prediction(tmp_path):
    """`whatif --placement` puts that placement's owners in the dp-kfac row at its world size:
    the row's seconds and bytes are the placement's own, for any solver that made it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "rr.json"
    assert run_dpkfac("plan", "--profile", str(PROFILE), "--workers", "3", "--solver",
                   "round-robin", "--inv-update-freq", "5", "--out", str(out),
                   env=env).returncode == 0
    result = run_dpkfac("whatif", "--profile", str(PROFILE), "--workers", "2,3",
                     "--inv-update-freq", "5", "--placement", str(out), "--format", "json",
                     env=env)
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout)["rows"]
               if r["algorithm"] == "dp-kfac" and r["workers"] == 3)
    predicted = json.loads(out.read_text())["predicted"]
    assert row["step_time_s"] == predicted["step_time_s"]
    assert row["comm_bytes_per_step"] == predicted["comm_bytes_per_step"]
    assert row["second_order_memory_bytes"] == max(w["memory_bytes"]
                                                   for w in predicted["per_worker"])
