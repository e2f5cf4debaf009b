"""examples/train_own_model.py, a user's own torchrun script (DDP, bf16 autocast, gradient
accumulation, an LR schedule, state_dict checkpoints) doing dpkfac.profile -> plan_for_group ->
DPKFAC in process: the loss falls, ranks end identical, and --resume continues exactly."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_own_model.py"


def _torchrun(*args: str) -> None:
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = subprocess.run([launcher, "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                             *args], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]


def test_example_trains_and_resumes_exactly(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    _torchrun("--out", str(whole), "--epochs", "3")
    placement = str(whole / "placement.json")  # one placement: owners decide the numerics
    _torchrun("--out", str(halves), "--epochs", "3", "--stop-after", "1",
              "--placement", placement)
    _torchrun("--out", str(halves), "--epochs", "3", "--resume")
    result = json.loads((whole / "result.json").read_text())
    resumed = json.loads((halves / "result.json").read_text())
    losses = result["epoch_losses"]
    assert losses[-1] < 0.8 * losses[0], losses
    digests = {r["digest"] for r in result["ranks"]}
    assert len(digests) == 1  # both ranks hold the same parameters
    assert resumed["ranks"] == result["ranks"]  # bit for bit, second-order memory too
    assert resumed["epoch_losses"] == losses[1:]
    assert result["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    # DP-KFAC: only the ranks that own layers hold second-order state (the planner may pick
    # fewer owners than ranks for a model this small)
    owners = set(json.loads((whole / "placement.json").read_text())["assignment"].values())
    assert [r["memory_bytes"] > 0 for r in result["ranks"]] == [k in owners for k in range(2)]
