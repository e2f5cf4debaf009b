"""The gradient all-reduce in buckets posted from backward (executor.runtime.buckets), its
partition (dpkfac.core.buckets), and the preconditioned-gradient broadcasts whose receives are
posted before a rank preconditions (Exchange.post_gradient_receives)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dpkfac.core.buckets import gradient_buckets
from executor.kfac import make_block
from executor.preconditioner import Exchange
from executor.preconditioner.numerics import NumericsLedger
from executor.runtime.buckets import GradientBuckets, model_bucket_bytes

from distributed_helpers import run_distributed
from executor_fixtures import random_batches, small_cnn


def test_partition_takes_every_parameter_once_in_reverse_order_under_the_caps():
    sizes = [100, 4000, 40, 9000, 300, 5000, 20]
    buckets = gradient_buckets(sizes, first_bytes=1000, bytes_per_bucket=6000)
    assert [i for b in buckets for i in b] == list(reversed(range(len(sizes))))
    # first closes at >= 1000 bytes, the others at >= 6000, the last takes what is left
    assert buckets == [[6, 5], [4, 3], [2, 1, 0]]
    assert gradient_buckets([]) == []
    assert gradient_buckets([10, 10]) == [[1, 0]]  # under every cap: one bucket


def test_model_bucket_bytes_add_up_to_the_gradient():
    model = small_cnn()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(model_bucket_bytes(model)) == total


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(3, 3)  # first in model order: in the last bucket
        self.net = small_cnn()

    def forward(self, x):
        return self.net(x)


def _bucketed(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = _WithUnused()
    buckets = GradientBuckets(model, world_size, first_bytes=64, bytes_per_bucket=512)
    batches = random_batches(7 + rank, 2)
    posted_in_backward = []
    for step in range(2):
        model.zero_grad()
        for i, (x, y) in enumerate(batches):  # two micro-batches, the last one armed
            loss = F.cross_entropy(model(x), y) / 2
            if i == 1:
                loss_buf = loss.detach().reshape(1).clone()
                buckets.arm(loss_buf)
            loss.backward()
        posted_in_backward.append(len(buckets._posted))
        buckets.post_remaining()
        local = [p.grad.clone() for p in model.net.parameters()]
        nbytes, finite = buckets.wait()
    fused = torch.cat([g.reshape(-1) for g in local])
    dist.all_reduce(fused)
    fused /= world_size
    return {"grads": [p.grad.clone() for p in model.net.parameters()], "fused": fused,
            "unused_grad": model.unused.weight.grad, "loss": float(loss_buf),
            "buckets": len(buckets.members), "posted_in_backward": posted_in_backward,
            "bytes": nbytes, "finite": finite}


def test_buckets_average_like_one_fused_all_reduce_on_three_ranks():
    results = run_distributed(_bucketed, 3)
    first = results[0]
    assert first["buckets"] >= 3
    for result in results:
        assert result["finite"]
        # buckets go out from backward (the first one at least), not all after it
        assert all(n >= 1 for n in result["posted_in_backward"])
        got = torch.cat([g.reshape(-1) for g in result["grads"]])
        torch.testing.assert_close(got, result["fused"], rtol=1e-6, atol=1e-7)
        for g, g0 in zip(result["grads"], first["grads"]):
            assert torch.equal(g, g0)  # every rank holds the same bits
        assert result["unused_grad"] is None  # no gradient, none made up
        assert result["loss"] == first["loss"]
    losses = {r["loss"] for r in results}
    assert len(losses) == 1
    # the unused layer travels as zeros: the buffers carry every parameter and the loss
    numel = sum(p.numel() for p in _WithUnused().parameters())
    assert first["bytes"] == 4 * (numel + 1)


def test_unarmed_hooks_do_nothing_and_arming_twice_is_refused():
    model = small_cnn()
    buckets = GradientBuckets(model, 1)
    x, y = random_batches(1, 1)[0]
    F.cross_entropy(model(x), y).backward()
    assert buckets._posted == []
    buckets.arm(torch.zeros(1))
    try:
        buckets.arm(torch.zeros(1))
    except RuntimeError as exc:
        assert "pending" in str(exc)
    else:
        raise AssertionError("a second arm() before wait() must be refused")
    buckets.post_remaining()
    assert buckets.wait()[1]
    buckets.remove()


def _early_receives(rank: int, world_size: int) -> dict:
    torch.manual_seed(1)
    blocks = {f"l{i}": make_block(nn.Linear(4 + i, 3 + i), f"l{i}") for i in range(4)}
    owners = {0: ["l0", "l3"], 1: ["l1"], 2: ["l2"]}
    exchange = Exchange.over()
    ledger = NumericsLedger({n: r for r, names in owners.items() for n in names}, rank)
    posted = exchange.post_gradient_receives(blocks, owners, ledger)
    mine = {n: torch.full((blocks[n].dim_g, blocks[n].dim_a), float(10 * rank + int(n[1])))
            for n in owners[rank]}
    results, totals = exchange.share_gradients(mine, blocks, owners, ledger, posted)
    return {"early": [item.src for item in posted],
            "results": {n: t.clone() for n, t in results.items()}, "totals": totals}


def test_receives_from_lower_ranked_owners_are_posted_before_preconditioning():
    results = run_distributed(_early_receives, 3)
    assert [r["early"] for r in results] == [[], [0], [0, 1]]
    for r in results:
        assert sorted(r["results"]) == ["l0", "l1", "l2", "l3"]
        for name, owner in (("l0", 0), ("l3", 0), ("l1", 1), ("l2", 2)):
            assert torch.all(r["results"][name] == 10 * owner + int(name[1]))
        assert r["totals"] == {}
