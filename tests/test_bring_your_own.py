"""A user's own model, data and loss through the commands: a module the project has never seen
(on PYTHONPATH) with .npz data, a token model with callable data and its own loss, synthetic
inputs from --input-shape, gradient accumulation with autocast, and the bad inputs, each one
`error:` line, exit 2, nothing written (checked on every rank under torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import ENV, run_dpkfac
from executor_fixtures import placement_dict

USER_MODULE = textwrap.dedent('''
    """A user's lab module: models, data and losses dpkfac has never seen."""
    import torch
    from torch import nn
    from torch.utils.data import Dataset


    def image_model():
        """3x12x12 images, 5 classes: two convolutions and a classifier."""
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 5))


    class TinyEncoder(nn.Module):
        """Token ids (B, T) -> next-token logits (B, T, V) through Linear layers."""

        def __init__(self, vocab=11, hidden=16):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.mix = nn.Linear(hidden, hidden)
            self.out = nn.Linear(hidden, vocab)

        def forward(self, ids):
            return self.out(torch.tanh(self.mix(self.embed(ids))))


    class Sequences(Dataset):
        """Sequences counting up modulo 11 from a random start: the target is the next id."""

        def __init__(self, n, seed):
            gen = torch.Generator().manual_seed(seed)
            start = torch.randint(0, 11, (n, 1), generator=gen)
            self.ids = (start + torch.arange(9)) % 11

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return self.ids[i, :-1], self.ids[i, 1:]


    def text_data():
        return Sequences(256, 0), Sequences(64, 1)


    def token_loss(output, target):
        return nn.functional.cross_entropy(output.transpose(1, 2), target)


    def vector_loss(output, target):
        return (output - output).sum(dim=-1)


    def nan_loss(output, target):
        return output.sum() * float("nan")


    def not_a_model():
        return 42
''')


def _images(n: int, seed: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a noisy image whose channel (k % 3) is bright in row band k: learnable."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(0, 0.5, (n, 3, 12, 12)).astype(np.float32)
    for k in range(classes):
        x[labels == k, k % 3, 2 * k:2 * k + 2, :] += 2.0
    return x, labels


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """A folder with the user's module and .npz data files."""
    root = tmp_path_factory.mktemp("lab")
    (root / "mylab.py").write_text(USER_MODULE)
    (x_train, y_train), (x_test, y_test) = _images(320, 0), _images(80, 1)
    np.savez(root / "images.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez(root / "no_test.npz", x_train=x_train, y_train=y_train, x_test=x_test)
    np.savez(root / "bad_labels.npz", x_train=x_train, y_train=y_train + 3, x_test=x_test,
             y_test=y_test)
    return root


def _run(lab: Path, *args: str, torchrun: int | None = None) -> subprocess.CompletedProcess:
    """`dpkfac ARGS` in the lab folder, the user's module on PYTHONPATH."""
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(lab), os.environ.get("PYTHONPATH", "")]))
    return run_dpkfac(*args, torchrun=torchrun, env=env, cwd=lab)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _clean_error(result: subprocess.CompletedProcess, *expect: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert errors, result.stderr
    for text in expect:
        assert text in errors[-1], errors[-1]


PROFILE_FAST = ("--repeats", "3", "--warmup", "0")


def _placement(lab: Path, name: str, assignment: dict, world_size: int) -> Path:
    """A placement of the user's image model on its .npz data."""
    doc = dict(placement_dict("mylab:image_model", assignment, world_size),
               data={"spec": "images.npz"}, loss="cross-entropy")
    (lab / name).write_text(json.dumps(doc))
    return lab / name


def test_npz_images_profile_plan_train_model_pt(lab):
    """A never-seen Conv2d + Linear model on .npz data through torchrun profile, plan and
    torchrun train; model.pt, loaded independently, gives summary.json's accuracy and loss."""
    _ok(_run(lab, "profile", "--model", "mylab:image_model", "--data", "images.npz",
             "--batch-size", "16", "--out", "img.profile.json", *PROFILE_FAST, torchrun=2))
    profile = json.loads((lab / "img.profile.json").read_text())
    assert profile["data"] == {"spec": "images.npz", "input_shape": [3, 12, 12],
                               "input_dtype": "float32"}
    assert profile["model"] == "mylab:image_model" and profile["loss"] == "cross-entropy"
    assert [l["name"] for l in profile["layers"]] == ["0", "3", "6"]
    assert profile["comm"]["world_size"] == 2
    assert profile["step"]["backward_allreduce_s"] >= 0  # timed with the buckets from backward
    _ok(_run(lab, "plan", "--profile", "img.profile.json", "--workers", "2",
             "--out", "img.placement.json"))
    placement = json.loads((lab / "img.placement.json").read_text())
    assert placement["data"] == profile["data"] and placement["loss"] == "cross-entropy"
    _ok(_run(lab, "train", "--placement", "img.placement.json", "--out", "img.run",
             "--epochs", "4", "--lr", "0.05", "--no-progress", torchrun=2))
    summary = json.loads((lab / "img.run" / "summary.json").read_text())
    assert summary["data"]["spec"] == "images.npz" and summary["parameters_identical"]

    sys.path.insert(0, str(lab))
    try:
        import mylab
    finally:
        sys.path.remove(str(lab))
    model = mylab.image_model()
    model.load_state_dict(torch.load(lab / "img.run" / "model.pt", weights_only=True),
                          strict=True)
    with np.load(lab / "images.npz") as npz:
        x, y = torch.from_numpy(npz["x_test"]), torch.from_numpy(npz["y_test"]).long()
    with torch.no_grad():
        output = model.eval()(x)
    accuracy = float((output.argmax(dim=1) == y).float().mean())
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert float(torch.nn.functional.cross_entropy(output, y)) == \
        pytest.approx(summary["test_loss"], rel=1e-5)
    assert summary["test_accuracy"] > 0.6  # chance is 0.2


def test_token_model_with_callable_data_and_loss(lab):
    """Token ids, Linear layers, a loss over (B, T, V) with (B, T) targets: callable data and
    --loss through profile, plan and train; the loss falls and token accuracy is reported."""
    _ok(_run(lab, "profile", "--model", "mylab:TinyEncoder", "--data", "mylab:text_data",
             "--loss", "mylab:token_loss", "--batch-size", "16", "--out", "txt.profile.json",
             *PROFILE_FAST))
    profile = json.loads((lab / "txt.profile.json").read_text())
    assert profile["loss"] == "mylab:token_loss"
    assert profile["data"]["input_dtype"] == "int64" and profile["data"]["input_shape"] == [8]
    assert [o["name"] for o in profile["other_layers"]] == ["embed"]
    _ok(_run(lab, "plan", "--profile", "txt.profile.json", "--workers", "1",
             "--out", "txt.placement.json"))
    _ok(_run(lab, "train", "--placement", "txt.placement.json", "--out", "txt.run",
             "--epochs", "6", "--lr", "0.05", "--no-progress"))
    summary = json.loads((lab / "txt.run" / "summary.json").read_text())
    losses = [json.loads(l)["loss"] for l in (lab / "txt.run" / "metrics.jsonl").open()]
    assert summary["loss"] == "mylab:token_loss"
    assert losses[-1] < 0.5 * losses[0]
    assert summary["test_accuracy"] is not None and summary["test_accuracy"] > 0.5


def test_input_shape_profiles_without_data_and_trains_on_it(lab):
    """--input-shape: synthetic inputs of that shape with labels over the model's outputs; the
    placement carries the shape so train needs no flags."""
    _ok(_run(lab, "profile", "--model", "mylab:image_model", "--input-shape", "3,12,12",
             "--num-classes", "5", "--batch-size", "8", "--out", "syn.profile.json",
             *PROFILE_FAST))
    profile = json.loads((lab / "syn.profile.json").read_text())
    assert profile["data"] == {"spec": "synthetic", "input_shape": [3, 12, 12],
                               "input_dtype": "float32", "num_classes": 5, "vocab_size": None}
    _ok(_run(lab, "plan", "--profile", "syn.profile.json", "--workers", "1",
             "--out", "syn.placement.json"))
    _ok(_run(lab, "train", "--placement", "syn.placement.json", "--out", "syn.run",
             "--max-steps", "3", "--no-progress"))
    summary = json.loads((lab / "syn.run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["spec"] == "synthetic"


@pytest.mark.parametrize("flags, expect", [
    (("--data", "no_test.npz"), "lacks array(s) y_test"),
    (("--data", "missing.npz"), "no such file"),
    (("--data", "digits"), "cannot take inputs of shape (2, 1, 8, 8)"),
    (("--data", "bad_labels.npz"), "labels range over 3..7, but the model's output has 5"),
    (("--data", "images.npz", "--loss", "mylab:vector_loss"), "expected a scalar tensor"),
    (("--data", "images.npz", "--loss", "mylab:nan_loss"), "expected a finite scalar"),
    (("--data", "nosuchmodule:make"), "cannot load data 'nosuchmodule:make'"),
    (("--data", "images.npz", "--loss", "mylab:nosuch"), "cannot load loss 'mylab:nosuch'"),
    (("--input-shape", "3,12,12", "--data", "images.npz"), "--input-shape describes synthetic"),
], ids=["missing-array", "missing-file", "wrong-shape", "labels", "vector-loss", "nan-loss",
        "unimportable-data", "unimportable-loss", "shape-and-data"])
def test_profile_bad_input(lab, flags, expect, monkeypatch, capsys):
    """In process (dpkfac.cli.main, the user's module on sys.path, run from the lab folder)."""
    from dpkfac.cli import main

    monkeypatch.syspath_prepend(str(lab))
    monkeypatch.chdir(lab)
    out = lab / "bad.profile.json"
    status = main(["profile", "--model", "mylab:image_model", "--batch-size", "8",
                   "--out", str(out), *flags])
    stderr = capsys.readouterr().err
    assert status == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error:") and expect in stderr, stderr
    assert not out.exists()


def test_train_bad_input_on_every_rank(lab):
    """Under torchrun 2 each rank checks before any process group forms, so no rank waits in a
    collective for one that gave up: the job ends at once with the error (torchrun stops the
    other rank when the first exits, so one or two ranks print it)."""
    placement = _placement(lab, "two.placement.json", {"0": 0, "3": 1, "6": 0}, 2)
    result = _run(lab, "train", "--placement", str(placement), "--out", "bad.run",
                  "--data", "bad_labels.npz", torchrun=2)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert 1 <= len(errors) <= 2, result.stderr
    assert all("labels range over 3..7" in e for e in errors), result.stderr
    assert not (lab / "bad.run").exists()


def test_train_model_override_that_is_not_a_module(lab):
    placement = _placement(lab, "one.placement.json", dict.fromkeys(("0", "3", "6"), 0), 1)
    result = _run(lab, "train", "--placement", str(placement), "--out", "x.run",
                  "--model", "mylab:not_a_model")
    _clean_error(result, "returned int, not an nn.Module")
    assert not (lab / "x.run").exists()


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]


def test_accumulating_two_half_batches_is_one_whole_batch(lab, tmp_path):
    """--accumulate 2 with micro-batches of 16 trains as batches of 32 do (the same samples per
    step; factors of the concatenation; the gradient of the mean loss), up to rounding."""
    placement = lab / "mlp.placement.json"
    placement.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1)))
    common = ("--placement", str(placement), "--max-steps", "6", "--no-progress")
    _ok(_run(lab, "train", *common, "--out", str(tmp_path / "whole"), "--batch-size", "32"))
    _ok(_run(lab, "train", *common, "--out", str(tmp_path / "micro"), "--batch-size", "16",
             "--accumulate", "2"))
    whole, micro = _losses(tmp_path / "whole"), _losses(tmp_path / "micro")
    assert len(micro) == 6
    assert micro == pytest.approx(whole, rel=1e-4)


def test_accumulate_with_bf16_autocast_resumes_exactly(lab, tmp_path):
    """--accumulate 2 --autocast bf16: a run stopped at step 4 and resumed to step 8 ends with
    the same model.pt, to the bit, as one uninterrupted run."""
    placement = lab / "mlp.placement.json"
    placement.write_text(json.dumps(placement_dict("digits-mlp", {"1": 0, "3": 0, "5": 0}, 1)))
    common = ("--placement", str(placement), "--accumulate", "2", "--autocast", "bf16",
              "--no-progress", "--batch-size", "16")
    _ok(_run(lab, "train", *common, "--out", str(tmp_path / "straight"), "--max-steps", "8"))
    _ok(_run(lab, "train", *common, "--out", str(tmp_path / "split"), "--max-steps", "4",
             "--checkpoint-every", "4"))
    _ok(_run(lab, "train", *common, "--out", str(tmp_path / "split"), "--max-steps", "8",
             "--checkpoint-every", "4", "--resume"))
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["accumulate"] == 2 and summary["autocast"] == "bf16"
