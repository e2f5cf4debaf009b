"""The learning-rate schedule of `dpkfac train`: a pure function of the step (so resume is
exact), the cosine's shape, the warm-up, and what a run records of it."""
import json
import math

import pytest

from dpkfac.core.errors import InputError
from executor.training.schedule import LRSchedule, set_learning_rate


def test_cosine_without_warmup_starts_at_the_base_rate_and_falls_to_zero():
    s = LRSchedule.of("cosine", 100)
    factors = [s.factor(k) for k in range(101)]
    assert factors[0] == 1.0
    assert factors[50] == pytest.approx(0.5)
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert s.factor(500) == pytest.approx(0.0, abs=1e-12)  # past the horizon: stays at 0


def test_warmup_rises_linearly_then_the_cosine_spans_the_rest():
    s = LRSchedule.of("cosine", 110, warmup_steps=10)
    assert [s.factor(k) for k in range(10)] == pytest.approx([(k + 1) / 11 for k in range(10)])
    assert s.factor(10) == 1.0
    assert s.factor(60) == pytest.approx(0.5)
    assert s.factor(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 100)))


def test_constant_and_degenerate_horizons():
    assert {LRSchedule.of("constant", 7).factor(k) for k in range(20)} == {1.0}
    one = LRSchedule.of("cosine", 0, warmup_steps=5)  # an empty run: horizon 1, no warm-up
    assert (one.horizon_steps, one.warmup_steps, one.factor(0)) == (1, 0, 1.0)
    with pytest.raises(InputError, match="--lr-schedule"):
        LRSchedule.of("step", 10)


def test_pure_in_the_step_and_sets_every_group():
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    s = LRSchedule.of("cosine", 40, warmup_steps=4)
    later = set_learning_rate(opt, 0.2, s, 30)
    set_learning_rate(opt, 0.2, s, 3)
    assert set_learning_rate(opt, 0.2, s, 30) == later == pytest.approx(0.2 * s.factor(30))
    assert [g["lr"] for g in opt.param_groups] == [later, later]
    assert json.loads(json.dumps(s.record())) == {"kind": "cosine", "warmup_steps": 4,
                                                  "horizon_steps": 40}
