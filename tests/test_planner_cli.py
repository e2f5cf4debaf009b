"""The `plan` and `whatif` subcommands, through the real CLI and through their own parser."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpkfac.core.placement import load_placement
from dpkfac.cli import main as cli_main

from planner_fixtures import run_planner_cli, synthetic_profile_dict, write_profile

ROOT = Path(__file__).resolve().parents[1]


planner_main = run_planner_cli


RUNNERS = [pytest.param(planner_main, id="planner-parser"),
           pytest.param(lambda argv: cli_main(argv), id="dpkfac-cli")]


@pytest.fixture
def profile(tmp_path):
    return write_profile(tmp_path, n_layers=10, seed=3)


@pytest.mark.parametrize("run", RUNNERS)
def test_plan_writes_a_valid_placement_and_reports(run, tmp_path, profile, capsys):
    out = tmp_path / "placement.json"
    assert run(["plan", "--profile", str(profile), "--workers", "3", "--out", str(out),
                "--time-limit", "5"]) == 0
    doc = load_placement(out)
    assert doc["world_size"] == 3 and len(doc["assignment"]) == 10
    printed = capsys.readouterr().out
    assert "lower bound" in printed and "status" in printed and str(out) in printed


@pytest.mark.parametrize("run", RUNNERS)
def test_plan_options(run, tmp_path, profile):
    out = tmp_path / "p.json"
    assert run(["plan", "--profile", str(profile), "--workers", "2", "--out", str(out),
                "--solver", "block", "--factor-update-freq", "2", "--inv-update-freq", "4",
                "--memory-cap", "1GiB", "--speeds", "1,0.5"]) == 0
    doc = json.loads(out.read_text())
    assert doc["solver"] == "block" and doc["config"]["factor_update_freq"] == 2
    assert doc["planner"]["memory_cap_bytes"] == 2 ** 30
    assert doc["planner"]["speeds"] == [1.0, 0.5]


@pytest.mark.parametrize("run", RUNNERS)
def test_whatif_formats(run, tmp_path, profile, capsys):
    assert run(["whatif", "--profile", str(profile), "--workers", "1,2,4"]) == 0
    table = capsys.readouterr().out
    assert "dp-kfac" in table and "kaisa-mem-opt" in table

    assert run(["whatif", "--profile", str(profile), "--workers", "1,2,4",
                "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "dpkfac.whatif/1" and doc["profile"] == str(profile)
    assert len(doc["rows"]) == 18
    assert {r["workers"] for r in doc["rows"]} == {1, 2, 4}

    assert run(["whatif", "--profile", str(profile), "--workers", "2", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["algorithm"] for r in rows] == ["sgd", "mpd-kfac", "kaisa-comm-opt",
                                              "kaisa-mem-opt", "dp-kfac-round-robin", "dp-kfac"]

    out = tmp_path / "w.csv"
    assert run(["whatif", "--profile", str(profile), "--workers", "2,8", "--format", "csv",
                "--out", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 12
    out = tmp_path / "w.json"
    assert run(["whatif", "--profile", str(profile), "--workers", "2,8", "--format", "json",
                "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 12


def bad_profile(tmp_path, kind: str) -> Path:
    path = tmp_path / f"{kind}.json"
    if kind == "notjson":
        path.write_text("{oops", encoding="utf-8")
    elif kind == "schema":
        path.write_text(json.dumps(dict(synthetic_profile_dict(3), schema="other/1")))
    elif kind == "field":
        doc = synthetic_profile_dict(3)
        del doc["layers"][1]["dim_a"]
        path.write_text(json.dumps(doc))
    return path


BAD_PLAN = {
    "missing-profile": lambda d, p: ["--profile", str(d / "nope.json"), "--workers", "2"],
    "not-json": lambda d, p: ["--profile", str(bad_profile(d, "notjson")), "--workers", "2"],
    "wrong-schema": lambda d, p: ["--profile", str(bad_profile(d, "schema")), "--workers", "2"],
    "missing-field": lambda d, p: ["--profile", str(bad_profile(d, "field")), "--workers", "2"],
    "bad-cap": lambda d, p: ["--profile", str(p), "--workers", "2", "--memory-cap", "lots"],
    "infeasible-cap": lambda d, p: ["--profile", str(p), "--workers", "2", "--memory-cap", "1KB"],
    "bad-speeds": lambda d, p: ["--profile", str(p), "--workers", "2", "--speeds", "1,x"],
    "speeds-count": lambda d, p: ["--profile", str(p), "--workers", "2", "--speeds", "1,1,1"],
}


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("case", sorted(BAD_PLAN))
def test_bad_plan_input_exits_2_without_output(run, case, tmp_path, profile, capsys):
    out = tmp_path / "out" / "placement.json"
    out.parent.mkdir()
    argv = ["plan", *BAD_PLAN[case](tmp_path, profile), "--out", str(out)]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("run", RUNNERS)
def test_missing_output_folder_is_checked_first(run, tmp_path, capsys):
    argv = ["plan", "--profile", str(tmp_path / "nope.json"), "--workers", "2",
            "--out", str(tmp_path / "no" / "p.json")]
    assert run(argv) == 2
    assert "output folder" in capsys.readouterr().err


BAD_WHATIF = {
    "bad-list": ["--workers", "1,two"],
    "zero": ["--workers", "0,2"],
    "empty": ["--workers", ""],
    "table-out": ["--workers", "2", "--out", "{dir}/w.txt"],
    "no-folder": ["--workers", "2", "--format", "json", "--out", "{dir}/no/w.json"],
}


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("case", sorted(BAD_WHATIF))
def test_bad_whatif_input_exits_2(run, case, tmp_path, profile, capsys):
    argv = ["whatif", "--profile", str(profile)]
    argv += [a.replace("{dir}", str(tmp_path)) for a in BAD_WHATIF[case]]
    before = set(tmp_path.iterdir())
    assert run(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("argv", [["plan", "--workers", "0"], ["plan", "--workers", "x"],
                                  ["whatif", "--format", "xml"]])
def test_argument_errors_exit_2(run, argv, tmp_path, profile, capsys):
    argv = argv + ["--profile", str(profile)]
    if argv[0] == "plan":
        argv += ["--out", str(tmp_path / "p.json")]
    else:
        argv += ["--workers", "2"]
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("sub", ["plan", "whatif"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        planner_main([sub, "--help"])
    assert info.value.code == 0
    assert "--profile" in capsys.readouterr().out


def test_planner_never_imports_torch():
    code = ("import planner.cli, planner.whatif.sweep, planner.placement, planner.solve.solvers, "
            "planner.model.costs, planner.whatif.baselines, planner.report.tables, planner.model.network, "
            "dpkfac.core.units, dpkfac.core.profile, dpkfac.core.jsonio, dpkfac.core.schemas, dpkfac.core.cluster, "
            "planner.model.simulate, planner.model.stagger, planner.plan, planner.solve.ilp, planner.solve.heuristics, "
            "planner.solve.localsearch, planner.solve.bounds, planner.solve.instance, planner.report.explain, "
            "planner.report.compare, planner.synthetic; import sys; "
            "bad = [m for m in ('torch', 'executor') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


CLUSTER = {"schema": "dpkfac.cluster/1", "nodes": 2, "gpus_per_node": 2,
           "intra_node": {"bandwidth_bytes_per_s": 1e11, "latency_s": 2e-6},
           "inter_node": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5},
           "workers": [{"rank": 2, "speed": 0.5}]}


@pytest.mark.parametrize("run", RUNNERS)
def test_plan_on_a_cluster_file(run, tmp_path, profile, capsys):
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(CLUSTER))
    out = tmp_path / "p.json"
    assert run(["plan", "--profile", str(profile), "--cluster", str(cluster),
                "--out", str(out)]) == 0
    doc = load_placement(out)
    assert doc["world_size"] == 4 and doc["planner"]["speeds"] == [1.0, 1.0, 0.5, 1.0]
    assert doc["planner"]["network"] == "cluster"
    assert run(["plan", "--profile", str(profile), "--cluster", str(cluster), "--workers", "4",
                "--out", str(out)]) == 0


@pytest.mark.parametrize("run", RUNNERS)
def test_explain_and_compare(run, tmp_path, profile, capsys):
    out = tmp_path / "p.json"
    assert run(["plan", "--profile", str(profile), "--workers", "3", "--out", str(out),
                "--explain", "--compare", "--time-limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Bottleneck: rank" in printed and "Lower bound" in printed and "Why" in printed
    assert "Critical path" in printed
    assert "Solvers compared" in printed
    for method in ("round-robin", "greedy", "block", "local-search", "ilp", "best"):
        assert method in printed
    assert load_placement(out)["world_size"] == 3


@pytest.mark.parametrize("run", RUNNERS)
def test_staggered_schedule_is_written_and_reported(run, tmp_path, profile, capsys):
    out = tmp_path / "p.json"
    assert run(["plan", "--profile", str(profile), "--workers", "3", "--out", str(out),
                "--inv-update-freq", "4"]) == 0
    doc = load_placement(out)
    assert set(doc["decomposition_step"]) == set(doc["assignment"])
    assert all(0 <= k < 4 for k in doc["decomposition_step"].values())
    staggered = doc["predicted"]["staggered"]
    assert "--stagger-decompositions" in staggered["honoured_by_executor"]
    assert len(staggered["per_step_makespan_s"]) == 4
    assert max(staggered["per_step_makespan_s"]) <= max(
        staggered["executor_per_step_makespan_s"]) + 1e-12
    assert doc["predicted"]["cycle"]["steps"] == 4
    assert "--stagger-decompositions" in capsys.readouterr().out


BAD_CLUSTER = {
    "missing": lambda d: ["--cluster", str(d / "nope.json")],
    "not-json": lambda d: ["--cluster", str(_write(d / "c.json", "{oops"))],
    "bad-field": lambda d: ["--cluster", str(_write(d / "c.json", json.dumps(
        dict(CLUSTER, nodes="two"))))],
    "mismatch": lambda d: ["--cluster", str(_write(d / "c.json", json.dumps(CLUSTER))),
                           "--workers", "3"],
    "speeds-and-cluster": lambda d: ["--cluster", str(_write(d / "c.json", json.dumps(CLUSTER))),
                                     "--speeds", "1,1,1,1"],
    "no-workers": lambda d: [],
    "tiny-memory": lambda d: ["--cluster", str(_write(d / "c.json", json.dumps(
        dict(CLUSTER, worker={"memory_bytes": 10}))))],
}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("case", sorted(BAD_CLUSTER))
def test_bad_cluster_input_exits_2_without_output(run, case, tmp_path, profile, capsys):
    out = tmp_path / "out" / "placement.json"
    out.parent.mkdir()
    argv = ["plan", "--profile", str(profile), *BAD_CLUSTER[case](tmp_path), "--out", str(out)]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert list(out.parent.iterdir()) == []


def test_infeasible_cap_names_the_smallest_cap(tmp_path, profile, capsys):
    out = tmp_path / "p.json"
    assert planner_main(["plan", "--profile", str(profile), "--workers", "3", "--out", str(out),
                         "--memory-cap", "100KiB"]) == 2
    assert "smallest cap" in capsys.readouterr().err
    assert not out.exists()
