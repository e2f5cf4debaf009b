"""Numerical safety: NaN factors, failing eigh, non-finite results and NaN losses keep training
going with finite weights, and the counters count them (metrics.jsonl and summary.json too)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from executor import DPKFAC
from executor.runtime.distributed import allreduce_mean_
from executor.training import TrainConfig, run_training

from distributed_helpers import run_distributed
from executor_fixtures import SMALL_CNN_LAYERS, placement_dict, small_cnn


def _setup(assignment=None, world_size=1, **hyper):
    torch.manual_seed(0)
    model = small_cnn()
    placement = placement_dict("tests:small_cnn", assignment or dict.fromkeys(SMALL_CNN_LAYERS, 0),
                               world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer, DPKFAC(model, placement, lr=0.05, damping=0.01, **hyper)


def _steps(model, optimizer, precond, n: int, *, seed: int = 0, world_size: int = 1,
           before_step=None) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for i in range(n):
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        allreduce_mean_([p.grad for p in model.parameters()], world_size)
        if before_step is not None:
            before_step(i, precond)
        precond.step()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _FailingEigh:
    """torch.linalg.eigh that raises for the calls whose index is in `fail` (or all calls)."""

    def __init__(self, fail=None) -> None:
        self.real, self.calls, self.fail = torch.linalg.eigh, 0, fail

    def __call__(self, *args, **kwargs):
        index, self.calls = self.calls, self.calls + 1
        if self.fail is None or index in self.fail:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge "
                                           "(injected)")
        return self.real(*args, **kwargs)


def test_injected_nan_factor_is_dropped_and_counted():
    model, optimizer, precond = _setup()

    def poison(i, p):
        if i in (2, 4):
            p.blocks["5"].factor_a[0, 0] = float("nan")
            p.blocks["8"].factor_g.fill_(float("inf"))

    losses = _steps(model, optimizer, precond, 8, before_step=poison)
    assert precond.numerics["nonfinite_factors"] == 4
    assert _finite(model) and all(map(lambda v: v == v, losses))
    assert bool(torch.isfinite(precond.blocks["5"].factor_a).all())  # rebuilt from later batches


def test_eigh_failing_at_first_is_retried_with_more_damping():
    model, optimizer, precond = _setup()
    eigh = _FailingEigh(fail={0, 9})  # the first attempt of two decompositions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "eigh", eigh)
        _steps(model, optimizer, precond, 3)
    assert precond.numerics["decompose_retries"] == 2
    assert precond.numerics["decompose_failures"] == 0 and _finite(model)


def test_eigh_always_failing_keeps_previous_decomposition_then_training_goes_on():
    model, optimizer, precond = _setup()
    _steps(model, optimizer, precond, 2)
    before = {k: v.clone() for k, v in precond.blocks["0"].decomposition.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "eigh", _FailingEigh())
        losses = _steps(model, optimizer, precond, 3, seed=1)
    counts = precond.numerics
    assert counts["decompose_failures"] == 3 * 2 * len(SMALL_CNN_LAYERS)  # 3 steps x A,G x layers
    assert counts["plain_gradient"] == 0  # the previous decompositions were used
    assert all(torch.equal(before[k], v) for k, v in precond.blocks["0"].decomposition.items())
    assert _finite(model) and all(v == v for v in losses)


def test_eigh_failing_from_the_start_falls_back_to_the_plain_gradient():
    model, optimizer, precond = _setup()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "eigh", _FailingEigh())
        _steps(model, optimizer, precond, 3)
    assert precond.numerics["plain_gradient"] == 3 * len(SMALL_CNN_LAYERS)
    assert _finite(model)


def test_non_finite_preconditioned_gradient_uses_the_plain_one(monkeypatch):
    model, optimizer, precond = _setup()
    block = precond.blocks["2"]
    monkeypatch.setattr(block, "precondition", lambda grad, *a: grad * float("nan"))
    _steps(model, optimizer, precond, 2)
    assert precond.numerics["plain_gradient"] == 2 and _finite(model)


def _owner_fails(rank: int, world_size: int) -> dict:
    """Rank 1 owns layers whose decompositions fail; every rank must learn the totals."""
    model, optimizer, precond = _setup({"0": 0, "2": 1, "5": 1, "8": 0}, world_size)
    if rank == 1:
        torch.linalg.eigh = _FailingEigh()
    _steps(model, optimizer, precond, 3, seed=rank, world_size=world_size)
    return {"numerics": precond.numerics, "params": [p.detach() for p in model.parameters()]}


def test_counters_reach_every_rank_with_the_broadcast():
    ranks = run_distributed(_owner_fails, 2)
    assert ranks[0]["numerics"] == ranks[1]["numerics"]
    assert ranks[0]["numerics"]["plain_gradient"] == 3 * 2
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))


def test_training_run_reports_counters_and_skips_nan_steps(tmp_path, monkeypatch):
    """dpkfac train (world size 1): a NaN loss is skipped, eigh failures fall back; both show in
    metrics.jsonl and summary.json, and the run ends with finite parameters."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1)))
    real_ce, calls = F.cross_entropy, []

    def nan_at_step_3(*args, **kwargs):
        loss = real_ce(*args, **kwargs)
        if not loss.requires_grad:  # the start-up checks of model, data and loss
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(F, "cross_entropy", nan_at_step_3)
    monkeypatch.setattr(torch.linalg, "eigh", _FailingEigh(fail=set(range(6, 30))))
    summary = run_training(TrainConfig(placement=str(placement), out_dir=str(tmp_path / "run"),
                                       max_steps=12, progress=False))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[3]["skipped"] is True and metrics[3]["loss"] is None
    assert metrics[-1]["numerics"]["skipped_steps"] == 1
    assert metrics[-1]["numerics"]["decompose_retries"] + metrics[-1]["numerics"]["decompose_failures"] > 0
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["numerics"] == metrics[-1]["numerics"] == summary["numerics"]
    assert written["numerics_per_layer"] and written["final_loss"] is not None


def test_all_finite_matches_the_element_wise_check():
    from executor.runtime.finite import all_finite

    big = torch.full((4,), 3e38)  # finite elements whose sum overflows
    for t in (torch.randn(5, 5), big, torch.zeros(0), torch.tensor([1.0, float("nan")]),
              torch.tensor([float("inf"), 1.0]), torch.tensor([float("-inf"), float("inf")])):
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


def test_eigen_denominator_follows_each_new_decomposition_and_damping():
    from executor.kfac import ComputeMethod, make_block

    torch.manual_seed(0)
    block, fresh = make_block(torch.nn.Linear(6, 4), "l"), make_block(torch.nn.Linear(6, 4), "l")
    grad = torch.randn(4, 7)
    for _ in range(2):  # a second decomposition replaces the cached denominator
        block.update_factors(block.compute_factor_a(torch.randn(9, 6)),
                             block.compute_factor_g(torch.randn(9, 4)), 0.5)
        block.decompose_a(ComputeMethod.EIGEN, 0.01)
        block.decompose_g(ComputeMethod.EIGEN, 0.01)
        for damping in (0.01, 0.1):
            block.precondition(grad, ComputeMethod.EIGEN, damping)  # fills the cache
            fresh.load_state(block.state_tensors())
            assert torch.equal(block.precondition(grad, ComputeMethod.EIGEN, damping),
                               fresh.precondition(grad, ComputeMethod.EIGEN, damping))
