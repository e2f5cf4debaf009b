"""Layers K-FAC does not cover keep their plain gradients and are listed in the profile; a model
with no K-FAC layer is a clear error."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dpkfac.core.errors import InputError
from executor import DPKFAC
from executor.kfac import kfac_layers, uncovered_layers

from executor_fixtures import placement_dict


class Tagger(nn.Module):
    """Token ids -> embedding -> layer norm -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def test_uncovered_layers_are_listed_and_keep_their_plain_gradients():
    torch.manual_seed(0)
    model = Tagger()
    assert [name for name, _ in kfac_layers(model)] == ["head"]
    assert uncovered_layers(model) == [{"name": "embed", "kind": "Embedding", "numel": 160},
                                       {"name": "norm", "kind": "LayerNorm", "numel": 16}]
    precond = DPKFAC(model, placement_dict("tagger", {"head": 0}, 1))
    ids = torch.randint(0, 20, (4, 6))
    for _ in range(2):  # step 0 builds and decomposes the factors, step 1 preconditions too
        model.zero_grad()
        nn.functional.cross_entropy(model(ids).reshape(-1, 5),
                                    torch.randint(0, 5, (24,))).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        precond.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.grad, plain[n])}
    assert changed == {"head.weight", "head.bias"}


def test_a_model_without_kfac_layers_is_an_input_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(InputError, match="no K-FAC layer"):
        DPKFAC(model, placement_dict("none", {"x": 0}, 1))


def test_profiling_a_model_without_kfac_layers_exits_2(tmp_path):
    (tmp_path / "nokfac.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Flatten(), nn.LayerNorm(64))\n")
    out = tmp_path / "profile.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get(
        "PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "dpkfac.cli", "profile", "--model",
                             "nokfac:build", "--batch-size", "4", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no K-FAC layer" in last
    assert "Traceback" not in result.stderr and not out.exists()
