"""The executor follows the planner's staggered decomposition schedule only when asked."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from executor import DPKFAC
from executor.kfac import KFACBlock

from executor_fixtures import SMALL_CNN_LAYERS, placement_dict, small_cnn

SLOTS = {"0": 0, "2": 1, "5": 2, "8": 1}


@pytest.mark.parametrize("stagger", [True, False])
def test_decompositions_follow_the_slots_when_asked(monkeypatch, stagger):
    torch.manual_seed(0)
    model = small_cnn()
    placement = placement_dict("small", dict.fromkeys(SMALL_CNN_LAYERS, 0), 1, inv_update_freq=3)
    placement["decomposition_step"] = SLOTS
    precond = DPKFAC(model, placement, stagger_decompositions=stagger)
    calls: Counter = Counter()
    original = KFACBlock.decompose_a

    def counting(block, *args, **kwargs):
        calls[(precond.steps, block.name)] += 1
        return original(block, *args, **kwargs)

    monkeypatch.setattr(KFACBlock, "decompose_a", counting)
    for _ in range(7):
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
    for step in range(7):
        for name in SMALL_CNN_LAYERS:
            if step == 0:
                due = True  # every layer starts with a decomposition
            elif stagger:
                due = step % 3 == SLOTS[name]
            else:
                due = step % 3 == 0
            assert calls[(step, name)] == int(due), (step, name)
