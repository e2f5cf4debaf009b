"""Split preconditioning (a placement's precondition_split): every rank preconditions its rows of
a layer's G side and one all-reduce adds the shares. Checked against the dense formula, against
the unsplit step, across gloo ranks (identical parameters, only owners hold factors) and
through a state_dict resume."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpkfac.core.errors import InputError
from dpkfac.core.strategy import MPD_KFAC
from executor import DPKFAC
from executor.preconditioner import KFACPreconditioner
from executor.kfac import ComputeMethod, make_block

from distributed_helpers import run_distributed
from executor_fixtures import placement_dict, random_batches, small_cnn, train_steps

ASSIGNMENT = {"0": 1, "2": 0, "5": 2, "8": 1}
SPLIT = {"8": [3, 3, 4], "2": [0, 6, 0]}  # dim_g 10 and 6; rank 0 owns "2" and takes none of it


def _decomposed_block(dim_in: int, dim_out: int, method: ComputeMethod):
    """A float64 Linear block (with bias) whose factors are random SPD matrices, decomposed."""
    torch.manual_seed(0)
    block = make_block(nn.Linear(dim_in, dim_out).double(), "fc")
    for side, dim in (("a", block.dim_a), ("g", block.dim_g)):
        x = torch.randn(dim, 2 * dim, dtype=torch.float64)
        setattr(block, f"factor_{side}", x @ x.t() / (2 * dim))
    block.decompose_a(method, 0.01)
    block.decompose_g(method, 0.01)
    return block


@pytest.mark.parametrize("method", [ComputeMethod.EIGEN, ComputeMethod.INVERSE])
@pytest.mark.parametrize("dims", [(30, 10), (200, 128)])  # (200, 128): the transposed path
def test_shares_add_up_to_the_dense_formula(method, dims):
    block = _decomposed_block(*dims, method)
    grad = torch.randn(block.dim_g, block.dim_a, dtype=torch.float64)
    bounds = [0, 1, block.dim_g // 2, block.dim_g]
    total = sum(block.precondition_rows(grad, method, 0.01, start, stop)
                for start, stop in zip(bounds, bounds[1:]))
    damping = 0.01
    a, g = block.factor_a, block.factor_g
    if method is ComputeMethod.EIGEN:  # ((G (x) A) + damping I)^-1 vec(dW), row-major vec
        dense = torch.linalg.solve(torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0],
                                                                          dtype=torch.float64),
                                   grad.reshape(-1)).reshape(grad.shape)
    else:
        root = damping ** 0.5
        dense = (torch.linalg.inv(g + root * torch.eye(g.shape[0], dtype=torch.float64)) @ grad
                 @ torch.linalg.inv(a + root * torch.eye(a.shape[0], dtype=torch.float64)))
    torch.testing.assert_close(total, dense, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(total, block.precondition(grad, method, damping),
                               rtol=1e-10, atol=1e-12)


def _placement(world_size: int, split: dict | None, inv_update_freq: int = 2) -> dict:
    doc = placement_dict("tests:small_cnn", ASSIGNMENT, world_size,
                         inv_update_freq=inv_update_freq)
    if split:
        doc["precondition_split"] = split
    return doc


def _snapshot(model, precond) -> dict:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": precond.state_dict(), "bytes": precond.comm_bytes_per_step()}


def _train(rank: int, world_size: int, split: dict | None, overlap: bool = True) -> dict:
    torch.manual_seed(0)
    model = small_cnn()
    precond = DPKFAC(model, _placement(world_size, split), lr=0.05, damping=0.01,
                     overlap=overlap)
    train_steps(model, precond, random_batches(100 + rank, 5), world_size=world_size)
    return _snapshot(model, precond)


def test_split_equals_unsplit_and_ranks_end_identical():
    split = run_distributed(_train, 3, SPLIT)
    whole = run_distributed(_train, 3, None)
    for rank in range(3):
        for got, mine, want in zip(split[rank]["params"], split[0]["params"],
                                   whole[0]["params"]):
            assert torch.equal(got, mine)  # bit-identical across ranks
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # summation order only
        blocks = split[rank]["state"]["blocks"]
        for name, owner in ASSIGNMENT.items():
            held = set(blocks.get(name, {}))
            if owner == rank:
                assert {"factor_a", "factor_g", "q_a", "q_g"} <= held
            elif name in SPLIT:  # the shared decomposition, never the factors
                assert held == {"q_a", "d_a", "q_g", "d_g"}, (rank, name, held)
            else:
                assert not held, (rank, name, held)
        sent = split[rank]["bytes"]
        assert sent["preconditioned_gradient_allreduce"] > 0
        assert sent["decomposition_broadcast"] > 0
        assert sent["preconditioned_gradient_broadcast"] < \
            whole[rank]["bytes"]["preconditioned_gradient_broadcast"]


def test_shares_first_overlapped_equals_the_serial_order_to_the_bit():
    """Overlapped, the shares are preconditioned first and their all-reduce runs under the
    rest (on the steps that share decompositions, every 2nd here, the own layers come first,
    under the decompositions' broadcasts); serial, it follows the broadcasts: the same sums,
    the same bits."""
    overlapped = run_distributed(_train, 3, SPLIT)
    serial = run_distributed(_train, 3, SPLIT, False)
    for rank in range(3):
        assert all(torch.equal(a, b) for a, b in zip(overlapped[rank]["params"],
                                                       serial[rank]["params"]))
        assert overlapped[rank]["bytes"] == serial[rank]["bytes"]


def _resume(rank: int, world_size: int) -> list[torch.Tensor]:
    """Three steps, then a resume from state_dicts into fresh objects, on an odd step (the next
    decomposition update is a step away: the shared decompositions come from the state)."""
    batches = random_batches(200 + rank, 6)
    torch.manual_seed(0)
    model = small_cnn()
    precond = DPKFAC(model, _placement(world_size, SPLIT, inv_update_freq=4), lr=0.05,
                     damping=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, precond, batches[:3], world_size=world_size, optimizer=optimizer)
    saved = ({k: v.clone() for k, v in model.state_dict().items()},
             precond.state_dict(), copy.deepcopy(optimizer.state_dict()))
    train_steps(model, precond, batches[3:], world_size=world_size, optimizer=optimizer)
    straight = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    fresh = small_cnn()
    fresh.load_state_dict(saved[0])
    again = DPKFAC(fresh, _placement(world_size, SPLIT, inv_update_freq=4), lr=0.05,
                   damping=0.01)
    again.load_state_dict(saved[1])
    opt_state = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt_state.load_state_dict(saved[2])
    train_steps(fresh, again, batches[3:], world_size=world_size, optimizer=opt_state)
    return [torch.equal(a, b.detach()) for a, b in zip(straight, fresh.parameters())]


def test_resume_from_state_is_exact():
    for equal in run_distributed(_resume, 3):
        assert all(equal)


def test_other_strategies_ignore_the_split():
    model = small_cnn()
    precond = KFACPreconditioner(model, _placement(1, None) | {
        "world_size": 1, "assignment": dict.fromkeys(ASSIGNMENT, 0),
        "precondition_split": {"8": [10]}}, strategy=MPD_KFAC)
    assert precond.work.split == {}
    dp = DPKFAC(small_cnn(), _placement(1, None) | {
        "world_size": 1, "assignment": dict.fromkeys(ASSIGNMENT, 0),
        "precondition_split": {"8": [10]}})
    assert dp.work.split == {"8": (10,)} and dp.work.rows("8") == (0, 10)


@pytest.mark.parametrize("split, message", [
    ({"8": [3, 3, 3]}, "rows add up to 9"),
    ({"8": [5, 5]}, "expected 3 row counts"),
    ({"9": [3, 3, 4]}, "not in the assignment"),
])
def test_bad_splits_are_input_errors(split, message):
    placement = _placement(3, split)
    placement["world_size"] = 3
    with pytest.raises(InputError, match=message):
        from dpkfac.core.placement import precondition_split
        precondition_split(placement, dims_g={"0": 4, "2": 6, "5": 5, "8": 10})


def _sum_column_major_shares(rank: int, world_size: int) -> dict:
    from executor.preconditioner import Exchange

    base = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    shares = {"t": (base * (rank + 1)).t().contiguous().t(),  # 4 x 3, column-major
              "r": torch.full((2, 5), float(rank))}
    exchange = Exchange.over()
    totals = exchange.collect_share_sum(exchange.post_share_sum(shares))
    return {name: (t.clone(), t.is_contiguous()) for name, t in totals.items()}


def test_column_major_shares_are_summed_in_their_own_layout():
    """Shares preconditioned through the transpose are column-major views: summed without a
    copy, handed back in the same layout, equal to the row-major sum."""
    for result in run_distributed(_sum_column_major_shares, 2):
        total, contiguous = result["t"]
        assert torch.equal(total, 3 * torch.arange(12, dtype=torch.float32).reshape(4, 3))
        assert not contiguous and total.t().is_contiguous()
        assert torch.equal(result["r"][0], torch.full((2, 5), 1.0))
