"""DP-KFAC across several gloo processes: equivalence, identical parameters, owner-only state."""
from __future__ import annotations

import torch

from executor import DPKFAC

from distributed_helpers import run_distributed
from executor_fixtures import (SMALL_CNN_LAYERS, placement_dict, random_batches, small_cnn,
                               train_steps)

STEPS = 6


def _train(rank: int, world_size: int, assignment: dict, data_seed: int,
           inv_update_freq: int = 1) -> dict:
    """A few DP-KFAC steps; returns final parameters and what this rank holds."""
    torch.manual_seed(0)
    model = small_cnn()
    placement = placement_dict("tests:small_cnn", assignment, world_size,
                               inv_update_freq=inv_update_freq)
    precond = DPKFAC(model, placement, lr=0.05, damping=0.01)
    train_steps(model, precond, random_batches(data_seed, STEPS), world_size=world_size)
    held = {name: sorted(block.state_tensors()) for name, block in precond.blocks.items()}
    return {"params": [p.detach().clone() for p in model.parameters()],
            "memory": precond.memory_usage(), "held": held, "owned": list(precond.owned)}


def _train_rank_dependent_data(rank: int, world_size: int, assignment: dict) -> dict:
    return _train(rank, world_size, assignment, data_seed=100 + rank, inv_update_freq=2)


def test_two_ranks_same_batches_all_on_rank0_equal_one_rank():
    assignment = dict.fromkeys(SMALL_CNN_LAYERS, 0)
    (single,) = run_distributed(_train, 1, assignment, 7)  # same thread settings as the ranks
    ranks = run_distributed(_train, 2, assignment, 7)
    for rank_result in ranks:
        for got, want in zip(rank_result["params"], single["params"]):
            assert torch.equal(got, want)
    assert ranks[0]["memory"] == single["memory"] > 0
    assert ranks[1]["memory"] == 0
    assert all(not held for held in ranks[1]["held"].values())


def test_split_layers_different_batches_identical_parameters_owner_only_state():
    assignment = {"0": 1, "2": 0, "5": 2, "8": 1}
    ranks = run_distributed(_train_rank_dependent_data, 3, assignment)
    reference = ranks[0]["params"]
    for rank_result in ranks[1:]:
        for got, want in zip(rank_result["params"], reference):
            assert torch.equal(got, want)
    for rank, result in enumerate(ranks):
        for name, held in result["held"].items():
            if assignment[name] == rank:
                assert {"factor_a", "factor_g", "q_a", "q_g", "d_a", "d_g"} <= set(held)
            else:
                assert held == []
        assert result["memory"] > 0
    # parameters moved away from the initial ones and differ from a 1-rank run on rank 0's data
    (single,) = run_distributed(_train_rank_dependent_data, 1, dict.fromkeys(assignment, 0))
    assert any(not torch.equal(a, b) for a, b in zip(single["params"], reference))


def test_rank_without_layers_holds_nothing():
    assignment = dict.fromkeys(SMALL_CNN_LAYERS, 1)
    ranks = run_distributed(_train_rank_dependent_data, 2, assignment)
    assert ranks[0]["memory"] == 0 and ranks[0]["owned"] == []
    assert ranks[1]["memory"] > 0
    for got, want in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(got, want)
