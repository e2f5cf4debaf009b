"""Gradient accumulation, factor_dtype under bf16 autocast, and GradScaler in DP-KFAC."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpkfac.core.strategy import KAISA_COMM_OPT
from executor import DPKFAC
from executor.kfac import ComputeMethod, kfac_layers, make_block
from executor.preconditioner import BaseKFACPreconditioner, Exchange, WorkAssignment

from distributed_helpers import run_distributed
from executor_fixtures import placement_dict, random_batches

LAYERS = ["0", "3", "5"]
B = 4  # samples per micro-batch


def conv_linear() -> nn.Module:
    """Conv2d (bias) -> Linear -> Linear on 1x8x8 inputs, 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10))


def one_rank(model: nn.Module, **hyper) -> DPKFAC:
    placement = placement_dict("tests:conv_linear", dict.fromkeys(LAYERS, 0), 1)
    return DPKFAC(model, placement, lr=0.05, damping=0.01, **hyper)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


def factors(precond: DPKFAC) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (b.factor_a.clone(), b.factor_g.clone()) for n, b in precond.blocks.items()}


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _accumulated_step(model, precond, x, y, micro_batches: int) -> None:
    """`micro_batches` backwards on equal slices, each loss mean / K, then one step()."""
    model.zero_grad()
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        (F.cross_entropy(model(xs), ys) / micro_batches).backward()
    precond.step()


def test_capture_keeps_every_micro_batch_until_the_step():
    model = conv_linear()
    precond = one_rank(model)
    (x, y), = random_batches(0, 1, batch=2 * B)
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        (F.cross_entropy(model(xs), ys) / 2).backward()
    assert [len(precond.capture.inputs[n]) for n in LAYERS] == [2, 2, 2]
    inputs, grad_outputs = precond.capture.batch("0")
    assert torch.equal(inputs, x) and grad_outputs.shape == (2 * B, 4, 8, 8)
    assert precond.capture.batch("5")[1].shape == (2 * B, 10)
    precond.step()
    assert precond.capture.complete(LAYERS) == [] and precond.capture.inputs == {}


def test_two_micro_batches_equal_one_double_batch():
    """Factors and preconditioned gradients of 2 x B (loss / 2 each) equal those of 2B."""
    batches = random_batches(1, 2, batch=2 * B)
    runs = {}
    for k in (1, 2):
        model = conv_linear()
        precond = one_rank(model)
        per_step = []
        for x, y in batches:  # two steps: the second folds into the running averages
            _accumulated_step(model, precond, x, y, k)
            per_step.append((factors(precond), grads(model)))
        runs[k] = per_step
    for (fac_1, grad_1), (fac_2, grad_2) in zip(runs[1], runs[2]):
        for name in LAYERS:
            assert rel_err(fac_2[name][0], fac_1[name][0]) < 1e-5
            assert rel_err(fac_2[name][1], fac_1[name][1]) < 1e-5
        for got, want in zip(grad_2, grad_1):
            assert rel_err(got, want) < 1e-5


def test_bf16_autocast_builds_float32_factors():
    model = conv_linear()
    precond = one_rank(model)
    (x, y), = random_batches(2, 1, batch=2 * B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(x).float(), y).backward()
        assert precond.capture.inputs["3"][0].dtype == torch.bfloat16
        assert precond.capture.grad_outputs["5"][0].dtype == torch.bfloat16
        assert precond.step() is True  # inside autocast too: step() turns it off
    for block in precond.blocks.values():
        assert block.factor_a.dtype == block.factor_g.dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in block.decomposition.values())
    assert all(p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all())
               for p in model.parameters())


def test_float64_factors_leave_float32_gradients():
    model = conv_linear()
    precond = one_rank(model, factor_dtype=torch.float64)
    (x, y), = random_batches(3, 1, batch=B)
    F.cross_entropy(model(x), y).backward()
    precond.step()
    assert all(b.factor_g.dtype == torch.float64 for b in precond.blocks.values())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_shared_decompositions_need_a_wire_dtype_that_holds_factor_dtype():
    """KAISA COMM-OPT broadcasts decompositions in the weights' dtype (bf16 here)."""
    model = conv_linear().to(torch.bfloat16)
    blocks = {name: make_block(module, name) for name, module in kfac_layers(model)}
    work = WorkAssignment(rank=0, strategy=KAISA_COMM_OPT, owner={"0": 0, "3": 1, "5": 0},
                          decomposition_slot=dict.fromkeys(LAYERS, 0))
    hyper = {"lr": 0.1, "damping": 0.01, "factor_decay": 0.95, "kl_clip": None,
             "factor_update_freq": 1, "inv_update_freq": 1, "compute_method": ComputeMethod.EIGEN}
    with pytest.raises(ValueError, match="factor_dtype"):
        BaseKFACPreconditioner(blocks, work, Exchange(rank=0, world_size=2), **hyper)
    BaseKFACPreconditioner(blocks, work, Exchange(rank=0, world_size=2), **hyper,
                           factor_dtype=torch.bfloat16).remove_hooks()


def test_sgd_with_dpkfac_under_bf16_autocast_lowers_the_loss():
    model = conv_linear()
    precond = one_rank(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = random_batches(4, 2, batch=2 * B)
    losses = []
    for step in range(12):
        x, y = batches[step % 2]
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        precond.step()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2])


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)


def _scaled_backward(model, optimizer, scaler, x, y, corrupt=None) -> None:
    """Backward of the scaled loss, `corrupt()` on the scaled gradients, then unscale_."""
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if corrupt is not None:
        corrupt()
    scaler.unscale_(optimizer)


def test_grad_scaler_loss_scale_is_divided_out_of_g():
    (x, y), = random_batches(5, 1, batch=2 * B)
    plain_model = conv_linear()
    plain = one_rank(plain_model)
    F.cross_entropy(plain_model(x), y).backward()
    plain.step()
    model = conv_linear()
    scaler = _scaler()
    precond = one_rank(model, grad_scaler=scaler)
    _scaled_backward(model, torch.optim.SGD(model.parameters(), lr=0.05), scaler, x, y)
    assert precond.step() is True
    for name in LAYERS:
        assert rel_err(precond.blocks[name].factor_g, plain.blocks[name].factor_g) < 1e-5
        assert rel_err(precond.blocks[name].factor_a, plain.blocks[name].factor_a) < 1e-5
    for got, want in zip(grads(model), grads(plain_model)):
        assert rel_err(got, want) < 1e-5
    assert precond.steps == 1 and precond.skipped_steps == 0


def test_non_finite_gradient_skips_the_step_and_is_counted():
    batches = random_batches(6, 2, batch=B)
    model = conv_linear()
    scaler = _scaler()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    precond = one_rank(model, grad_scaler=scaler)
    _scaled_backward(model, optimizer, scaler, *batches[0])
    precond.step()
    scaler.step(optimizer)
    scaler.update()
    before, weights = factors(precond), [p.detach().clone() for p in model.parameters()]
    _scaled_backward(model, optimizer, scaler, *batches[1],
                     corrupt=lambda: model[3].bias.grad.index_fill_(0, torch.tensor([0]),
                                                                    float("inf")))
    raw = grads(model)
    assert precond.step() is False
    scaler.step(optimizer)  # skips too: unscale_ found the inf
    scaler.update()
    assert precond.skipped_steps == 1 and precond.steps == 1
    assert precond.capture.inputs == {} and precond.capture.grad_outputs == {}
    for name, (a, g) in before.items():
        assert torch.equal(precond.blocks[name].factor_a, a)
        assert torch.equal(precond.blocks[name].factor_g, g)
    for got, want in zip(grads(model), raw):  # gradients left as they were
        assert torch.equal(got, want)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    state = precond.state_dict()
    assert state["skipped_steps"] == 1
    fresh = one_rank(conv_linear(), grad_scaler=scaler)
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 1 and fresh.steps == 1
    del state["skipped_steps"]  # a state dict from before the counter existed
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 0


def _ddp_accumulation(rank: int, world_size: int) -> dict:
    """DDP, 2 micro-batches per step (the first under no_sync), bf16 autocast, layers on both
    ranks; rank-dependent data."""
    model = conv_linear()
    ddp = nn.parallel.DistributedDataParallel(model)
    placement = placement_dict("tests:conv_linear", {"0": 1, "3": 0, "5": 1}, world_size)
    precond = DPKFAC(ddp, placement, lr=0.05, damping=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = random_batches(10 + rank, 2, batch=2 * B)
    losses = []
    for step in range(8):
        x, y = batches[step % 2]
        optimizer.zero_grad()
        total = 0.0
        for i, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2))):
            sync = ddp.no_sync() if i == 0 else contextlib.nullcontext()
            with sync, torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(ddp(xs).float(), ys) / 2
            loss.backward()
            total += float(loss.detach())
        precond.step()
        optimizer.step()
        losses.append(total)
    return {"params": [p.detach().clone() for p in model.parameters()], "losses": losses,
            "owned": precond.owned}


def test_ddp_no_sync_accumulation_under_autocast_two_ranks():
    ranks = run_distributed(_ddp_accumulation, 2)
    assert ranks[0]["owned"] == ["3"] and ranks[1]["owned"] == ["0", "5"]
    for got, want in zip(ranks[1]["params"], ranks[0]["params"]):
        assert torch.equal(got, want)
    for result in ranks:
        losses = result["losses"]
        assert sum(losses[-2:]) < 0.8 * sum(losses[:2])
