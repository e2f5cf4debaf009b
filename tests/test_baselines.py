"""The baselines in the executor (one K-FAC core, strategy injected): invariants with gloo,
byte accounting against hand counts, and the what-if prediction of the same bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpkfac.cli import main as cli_main
from executor import DPKFAC
from executor.runtime.distributed import WorldInfo
from executor.preconditioner import KFACPreconditioner
from executor.training.loop import StepClock, train_step
from executor.runtime.faults import RunPosition
from planner.model.costs import traffic_by_kind
from planner.whatif.baselines import algorithm_cost
from planner.model.costs import PlanConfig
from dpkfac.core.profile import profile_from_dict
from dpkfac.core.strategy import (DP_KFAC, KAISA_COMM_OPT, KAISA_MEM_OPT, MPD_KFAC, STRATEGY_OF,
                              kaisa_variant, parse_fraction)
from dpkfac.core.errors import InputError

from distributed_helpers import run_distributed
from executor_fixtures import (SMALL_CNN_LAYERS, placement_dict, random_batches, small_cnn,
                               train_steps)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
ASSIGNMENT = {"0": 1, "2": 0, "5": 1, "8": 0}
VARIANTS = {"dp-kfac": DP_KFAC, "mpd-kfac": MPD_KFAC, "kaisa-comm-opt": KAISA_COMM_OPT,
            "kaisa-mem-opt": KAISA_MEM_OPT}
# small_cnn's K-FAC layers (dim_a, dim_g): conv 1->4 3x3 with bias (10, 4); conv 4->6 3x3 no
# bias (36, 6); linear 9->5 (10, 5); linear 30->10 (31, 10).
DIMS = {"0": (10, 4), "2": (36, 6), "5": (10, 5), "8": (31, 10)}
GRAD_BYTES = 4 * (40 + 216 + 50 + 310)                       # 2464: all layers' dW, float32
FACTOR_BYTES = 4 * (100 + 16 + 1296 + 36 + 100 + 25 + 961 + 100)  # 10536: every A and G
EIGEN_BYTES = 4 * (110 + 20 + 1332 + 42 + 110 + 30 + 992 + 110)   # 10984: Q and d of each
COUNTER_BYTES = 2 * 16                                        # 2 owners x 4 float32 counters


def _batches(seed: int):
    return random_batches(seed, STEPS)


def _train(strategy, *, world_size: int, assignment: dict, data_seed: int, **hyper) -> tuple:
    """A few K-FAC steps of small_cnn; (model, preconditioner)."""
    torch.manual_seed(0)
    model = small_cnn()
    precond = KFACPreconditioner(model, placement_dict("tests:small_cnn", assignment, world_size),
                                 strategy=strategy, lr=0.05, damping=0.01, **hyper)
    train_steps(model, precond, _batches(data_seed), world_size=world_size)
    return model, precond


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _sgd(rank: int, world_size: int) -> list[torch.Tensor]:
    """Data-parallel SGD through the training loop's own step (averaged gradients)."""
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    world = WorldInfo(rank=rank, world_size=world_size, local_rank=rank,
                      device=torch.device("cpu"), backend="gloo")
    for x, y in _batches(50):
        half = len(x) // world_size
        train_step(model, optimizer, None, x[rank * half:(rank + 1) * half],
                    y[rank * half:(rank + 1) * half], world, StepClock(False), RunPosition())
    return _params(model)


def _all_variants(rank: int, world_size: int) -> dict:
    """Every algorithm on rank-dependent data; what each rank ends with."""
    out = {}
    for name, strategy in VARIANTS.items():
        model, precond = _train(strategy, world_size=world_size, assignment=ASSIGNMENT,
                                data_seed=100 + rank)
        state = precond.state_dict()
        fresh = KFACPreconditioner(small_cnn(), placement_dict("tests:small_cnn", ASSIGNMENT,
                                                               world_size), strategy=strategy)
        fresh.load_state_dict(state)
        out[name] = {"params": _params(model), "bytes": precond.comm_bytes_per_step(),
                     "memory": precond.memory_usage(), "reloaded": fresh.memory_usage(),
                     "numerics": precond.numerics}
    out["sgd"] = _sgd(rank, world_size)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_all_variants, 2)


def test_every_algorithm_ends_with_identical_parameters_on_all_ranks(two_ranks):
    for name in (*VARIANTS, "sgd"):
        first = two_ranks[0][name]["params"] if name != "sgd" else two_ranks[0]["sgd"]
        other = two_ranks[1][name]["params"] if name != "sgd" else two_ranks[1]["sgd"]
        assert all(torch.equal(a, b) for a, b in zip(first, other)), name


def test_sgd_equals_plain_full_batch_averaging(two_ranks):
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in _batches(50):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # mean over the whole batch = mean of halves
        optimizer.step()
    for got, want in zip(two_ranks[0]["sgd"], _params(model)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kaisa_comm_opt_and_mem_opt_agree(two_ranks):
    comm_opt, mem_opt = two_ranks[0]["kaisa-comm-opt"], two_ranks[0]["kaisa-mem-opt"]
    for a, b in zip(comm_opt["params"], mem_opt["params"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # same data and factors as mpd-kfac: mem-opt is mpd-kfac's pattern, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(mem_opt["params"],
                                                 two_ranks[0]["mpd-kfac"]["params"]))


def test_bytes_per_step_match_hand_counts(two_ranks):
    ring = 2 * FACTOR_BYTES  # ring all-reduce at p = 2: 4 (p-1)/p n, sent + received
    expected = {
        "dp-kfac": {"factor_allreduce": 0, "decomposition_broadcast": 0,
                    "preconditioned_gradient_broadcast": GRAD_BYTES},
        "mpd-kfac": {"factor_allreduce": ring, "decomposition_broadcast": 0,
                     "preconditioned_gradient_broadcast": GRAD_BYTES},
        "kaisa-mem-opt": {"factor_allreduce": ring, "decomposition_broadcast": 0,
                          "preconditioned_gradient_broadcast": GRAD_BYTES},
        "kaisa-comm-opt": {"factor_allreduce": ring, "decomposition_broadcast": EIGEN_BYTES,
                           "preconditioned_gradient_broadcast": 0},
    }
    for rank in (0, 1):
        for name, kinds in expected.items():
            got = two_ranks[rank][name]["bytes"]
            assert {k: got[k] for k in kinds} == kinds, (rank, name)
            assert got["numerics_counters"] == COUNTER_BYTES
            assert got["broadcast"] == (kinds["decomposition_broadcast"] + COUNTER_BYTES
                                        + kinds["preconditioned_gradient_broadcast"])


def _small_cnn_profile() -> dict:
    layers = [{"name": n, "kind": "Linear", "dim_a": a, "dim_g": g, "grad_numel": a * g,
               "factor_a_s": 1e-4, "factor_g_s": 1e-4, "decompose_a_s": 1e-3,
               "decompose_g_s": 1e-3, "precondition_s": 1e-4,
               "state_bytes": 4 * (2 * a * a + a + 2 * g * g + g)} for n, (a, g) in DIMS.items()]
    link = {"alpha_s": 1e-5, "beta_s_per_byte": 1e-9}
    return {"schema": "dpkfac.profile/1", "model": "tests:small_cnn", "batch_size": 8,
            "device": "cpu", "dtype": "float32", "compute_method": "eigen", "measured": False,
            "layers": layers, "step": {"forward_backward_s": 0.01, "optimizer_s": 0.001},
            "comm": {"backend": "gloo", "world_size": 2, "allreduce": link, "broadcast": link}}


def test_prediction_equals_measured_bytes_and_memory(two_ranks):
    profile = profile_from_dict(_small_cnn_profile())
    owners = [ASSIGNMENT[n] for n in DIMS]
    for name, strategy in VARIANTS.items():
        predicted = traffic_by_kind(profile, strategy=strategy, owners=owners, workers=2,
                                    config=PlanConfig())
        measured = two_ranks[0][name]["bytes"]
        for kind, value in predicted.items():
            if kind != "gradient_allreduce":  # the test loop all-reduces outside the precond.
                assert measured[kind] == value, (name, kind)
        cost = algorithm_cost(profile, algorithm=name, workers=2, config=PlanConfig(),
                              owners=owners)
        busiest = max(two_ranks[r][name]["memory"] for r in (0, 1))
        assert cost.second_order_memory_bytes == busiest, name
        assert [two_ranks[r][name]["reloaded"] for r in (0, 1)] == \
            [two_ranks[r][name]["memory"] for r in (0, 1)], name
        assert set(two_ranks[0][name]["numerics"].values()) == {0}


def test_mpd_kfac_equals_dp_kfac_at_world_size_one():
    assignment = dict.fromkeys(SMALL_CNN_LAYERS, 0)
    results = {name: _params(_train(VARIANTS[name], world_size=1, assignment=assignment,
                                    data_seed=3)[0]) for name in ("dp-kfac", "mpd-kfac")}
    assert all(torch.equal(a, b) for a, b in zip(results["dp-kfac"], results["mpd-kfac"]))
    _, default = _train(DP_KFAC, world_size=1, assignment=assignment, data_seed=3)
    assert DPKFAC is KFACPreconditioner and default.strategy == DP_KFAC


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_numerics_counters_work_for_every_algorithm(name, monkeypatch):
    def failing_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    _, precond = _train(VARIANTS[name], world_size=1, assignment=dict.fromkeys(DIMS, 0),
                        data_seed=4)
    counts = precond.numerics
    assert counts["plain_gradient"] == STEPS * len(DIMS)
    assert counts["decompose_failures"] == STEPS * 2 * len(DIMS)


def test_grad_worker_fraction_parsing_and_hybrid_refused():
    assert kaisa_variant(parse_fraction("1"), workers=4) == "kaisa-comm-opt"
    assert kaisa_variant(parse_fraction("1/4"), workers=4) == "kaisa-mem-opt"
    assert kaisa_variant(parse_fraction("0.25"), workers=4) == "kaisa-mem-opt"
    with pytest.raises(InputError, match="HYBRID"):
        kaisa_variant(parse_fraction("0.5"), workers=4)
    for bad in ("0", "1.5", "x", "1/0"):
        with pytest.raises(InputError):
            parse_fraction(bad)
    assert set(STRATEGY_OF) >= set(VARIANTS)


@pytest.mark.parametrize("flags", [["--algorithm", "kaisa", "--grad-worker-fraction", "0.5"],
                                   ["--algorithm", "dp-kfac", "--grad-worker-fraction", "1"]])
def test_bad_kaisa_flags_exit_2(flags, tmp_path, capsys):
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1)))
    code = cli_main(["train", "--placement", str(placement), "--out", str(tmp_path / "run"),
                     "--max-steps", "1", "--no-progress", *flags])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "run").exists()


def test_torchrun_summary_bytes_equal_the_whatif_prediction(tmp_path):
    """`dpkfac train` under torchrun (2 gloo workers, KAISA MEM-OPT): summary.json's bytes by
    kind, gradient all-reduce included, are what the what-if predicts for that placement."""
    profile_path = ROOT / "profiles" / "digits-mlp.b32.cpu2-gloo.json"
    profile = profile_from_dict(json.loads(profile_path.read_text()))
    assignment = {layer.name: i % 2 for i, layer in enumerate(profile.layers)}
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps(placement_dict("digits-mlp", assignment, 2)))
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "dpkfac.cli",
                    "train", "--placement", str(placement), "--out", str(tmp_path / "run"),
                    "--max-steps", "3", "--epochs", "1", "--no-progress", "--algorithm",
                    "kaisa", "--grad-worker-fraction", "1/2"], check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, timeout=300)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cost = algorithm_cost(profile, algorithm="kaisa-mem-opt", workers=2, config=PlanConfig(),
                          owners=[assignment[l.name] for l in profile.layers])
    measured = summary["comm_bytes_per_step"]
    assert summary["variant"] == "kaisa-mem-opt" and summary["parameters_identical"]
    assert measured["total"] == cost.comm_bytes_per_step
    for kind, value in cost.comm_bytes_by_kind.items():
        assert measured[kind] == value, kind
    assert measured["allreduce"] == measured["gradient_allreduce"]
    assert max(summary["second_order_memory_bytes"]) == cost.second_order_memory_bytes
