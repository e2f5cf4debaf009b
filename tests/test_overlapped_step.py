"""The overlapped DP-KFAC step (prepare while the gradient all-reduce is in flight, then
finish) against the serial one: the same numbers to the bit, on every rank; rollback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from executor import DPKFAC
from executor.runtime.buckets import GradientBuckets
from executor.runtime.distributed import start_gradient_average

from distributed_helpers import run_distributed
from executor_fixtures import (SMALL_CNN_LAYERS, placement_dict, random_batches, small_cnn,
                               train_steps)

STEPS = 5
ASSIGNMENT = {"0": 1, "2": 0, "5": 2, "8": 1}


def _overlapped_steps(model, precond, batches, world_size: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pending = start_gradient_average([p.grad for p in model.parameters()], world_size)
        assert precond.prepare()
        _, finite = pending.wait()
        assert finite and precond.finish()
        optimizer.step()


def _bucketed_steps(model, precond, batches, world_size: int, overlapped: bool) -> None:
    """The loop of docs/executor.md: buckets from backward (several: tiny caps), prepare()
    while they are in flight, finish(); or, not overlapped, the same buckets after backward
    and step()."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    buckets = GradientBuckets(model, world_size, first_bytes=64, bytes_per_bucket=512)
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if overlapped:
            buckets.arm(loss.detach().reshape(1).clone())
        loss.backward()
        if not overlapped:
            buckets.arm(loss.detach().reshape(1).clone())
        buckets.post_remaining()
        prepared = precond.prepare()
        assert prepared == overlapped
        _, finite = buckets.wait()
        assert finite and (precond.finish() if prepared else precond.step())
        optimizer.step()
    assert len(buckets.members) >= 3


def _train(rank: int, world_size: int, overlapped: bool, bucketed: bool = False) -> dict:
    torch.manual_seed(0)
    model = small_cnn()
    placement = placement_dict("tests:small_cnn", ASSIGNMENT, world_size, inv_update_freq=2)
    precond = DPKFAC(model, placement, lr=0.05, damping=0.01, overlap=overlapped)
    batches = random_batches(100 + rank, STEPS)
    if bucketed:
        _bucketed_steps(model, precond, batches, world_size, overlapped)
    elif overlapped:
        _overlapped_steps(model, precond, batches, world_size)
    else:
        train_steps(model, precond, batches, world_size=world_size)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": precond.state_dict(), "phases": precond.phase_times}


def test_overlapped_equals_serial_to_the_bit_on_every_rank():
    serial = run_distributed(_train, 3, False)
    overlapped = run_distributed(_train, 3, True)
    for rank in range(3):
        for got, want in zip(overlapped[rank]["params"], serial[0]["params"]):
            assert torch.equal(got, want)
        want_blocks = serial[rank]["state"]["blocks"]
        got_blocks = overlapped[rank]["state"]["blocks"]
        assert sorted(got_blocks) == sorted(want_blocks)
        for name, tensors in want_blocks.items():
            for key, tensor in tensors.items():
                assert torch.equal(got_blocks[name][key], tensor), (rank, name, key)
    assert overlapped[1]["phases"]["factors"] > 0  # prepare's phases are timed


def test_buckets_from_backward_overlapped_equal_after_backward_serial_to_the_bit():
    serial = run_distributed(_train, 3, False, True)
    overlapped = run_distributed(_train, 3, True, True)
    fused = run_distributed(_train, 3, False, False)
    for rank in range(3):
        for got, want, one in zip(overlapped[rank]["params"], serial[0]["params"],
                                  fused[0]["params"]):
            assert torch.equal(got, want)
            torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-6)  # summation order only


def _one_step(model, precond) -> None:
    x, y = random_batches(5, 1)[0]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def _rollback(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    precond = DPKFAC(model, placement_dict("tests:small_cnn", dict.fromkeys(SMALL_CNN_LAYERS, 0),
                                           world_size), lr=0.05, damping=0.01)
    train_steps(model, precond, random_batches(3, 3), world_size=world_size)
    before = precond.state_dict()
    _one_step(model, precond)
    assert precond.prepare()
    if rank == 0:  # it owns every layer
        assert not torch.equal(precond.blocks["0"].factor_a, before["blocks"]["0"]["factor_a"])
    with pytest.raises(RuntimeError, match="pending"):  # no checkpoint of a half-done step
        precond.state_dict()
    precond.rollback()
    after = precond.state_dict()
    assert after["steps"] == before["steps"] and after["numerics"] == before["numerics"]
    for name, tensors in before["blocks"].items():
        assert set(after["blocks"][name]) == set(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(after["blocks"][name][key], tensor), (name, key)
    assert not precond.capture.inputs and not precond.capture.grad_outputs


def test_rollback_restores_factors_decompositions_and_counters():
    run_distributed(_rollback, 2)


def test_alone_prepare_does_nothing():
    """At world size 1 there is no all-reduce to hide behind: the step stays serial."""
    torch.manual_seed(0)
    model = small_cnn()
    precond = DPKFAC(model, placement_dict("tests:small_cnn", dict.fromkeys(SMALL_CNN_LAYERS, 0),
                                           1), lr=0.05, damping=0.01)
    _one_step(model, precond)
    assert not precond.prepare()
    assert precond.finish() and precond.steps == 1 and precond.memory_usage() > 0


def test_without_overlap_prepare_does_nothing_and_finish_is_step():
    torch.manual_seed(0)
    model = small_cnn()
    precond = DPKFAC(model, placement_dict("tests:small_cnn", dict.fromkeys(SMALL_CNN_LAYERS, 0),
                                           1), lr=0.05, damping=0.01, overlap=False)
    _one_step(model, precond)
    assert not precond.prepare()
    assert precond.memory_usage() == 0
    assert precond.finish() and precond.steps == 1 and precond.memory_usage() > 0


def test_train_command_overlapped_and_serial_end_with_the_same_weights(tmp_path):
    import json

    from cli_helpers import run_dpkfac

    path = tmp_path / "placement.json"
    owners = {"conv1": 1, "conv2": 0, "fc1": 0, "fc2": 1}
    path.write_text(json.dumps(placement_dict("digits-cnn", owners, 2, inv_update_freq=2)))
    runs = {}
    for name, flags in (("overlapped", ()), ("serial", ("--no-overlap",))):
        result = run_dpkfac("train", "--placement", str(path), "--out", str(tmp_path / name),
                            "--max-steps", "12", "--no-progress", *flags, torchrun=2)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert runs["overlapped"]["overlap"] is True and runs["serial"]["overlap"] is False
    assert runs["overlapped"]["parameters_identical"]
    assert runs["overlapped"]["parameter_sha256"] == runs["serial"]["parameter_sha256"]
    assert runs["overlapped"]["final_loss"] == runs["serial"]["final_loss"]
