"""Malformed input through the real command line (dpkfac.cli.main, in-process): every case ends
with one `error:` line naming the file and field, exit status 2, no traceback, nothing written."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from dpkfac.cli import main
from executor.training import TrainConfig, run_training
from executor_fixtures import placement_dict

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "digits-mlp.b32.cpu2-gloo.json"
MLP = {"1": 0, "3": 0, "5": 0}


@dataclass(frozen=True)
class Case:
    """One bad input: `make(tmp)` writes files and returns argv; `expect` must be in the error."""
    id: str
    make: Callable[[Path], list[str]]
    expect: str


def _profile_doc() -> dict:
    return json.loads(PROFILE.read_text())


def _write(tmp: Path, name: str, content) -> Path:
    path = tmp / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _plan(profile_edit: Callable[[dict], object] | str) -> Callable[[Path], list[str]]:
    """argv for `plan` with a profile edited by `profile_edit` (or given as raw text)."""
    def make(tmp: Path) -> list[str]:
        if isinstance(profile_edit, str):
            path = _write(tmp, "profile.json", profile_edit)
        else:
            doc = _profile_doc()
            doc = profile_edit(doc) or doc
            path = _write(tmp, "profile.json", doc)
        return ["plan", "--profile", str(path), "--workers", "2", "--out", str(tmp / "out.json")]
    return make


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *parents, last = path.split("/")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return edit


_DELETE = object()


def _train(placement_edit: Callable[[dict], object] | str | None = None, *extra: str,
           world: int = 1, assignment: dict | None = None) -> Callable[[Path], list[str]]:
    """argv for `train` (world size 1, in-process) with an edited placement."""
    def make(tmp: Path) -> list[str]:
        doc = placement_dict("digits-mlp", assignment or MLP, world)
        if isinstance(placement_edit, str):
            path = _write(tmp, "placement.json", placement_edit)
        else:
            if placement_edit is not None:
                doc = placement_edit(doc) or doc
            path = _write(tmp, "placement.json", doc)
        return ["train", "--placement", str(path), "--out", str(tmp / "run"), "--max-steps", "2",
                "--no-progress", *extra]
    return make


def _model(name: str) -> Callable[[dict], None]:
    return _set("model", name)


def _resume(tamper: Callable[[dict], object] | bytes) -> Callable[[Path], list[str]]:
    """argv for `train --resume` from a copy of a real checkpoint, tampered with."""
    def make(tmp: Path) -> list[str]:
        run = tmp / "run"
        shutil.copytree(_good_run(), run)
        ckpt = run / "checkpoint.pt"
        if isinstance(tamper, bytes):
            ckpt.write_bytes(tamper)
        else:
            payload = torch.load(ckpt, weights_only=True)
            payload = tamper(payload) or payload
            torch.save(payload, ckpt)
        (run / "summary.json").unlink()
        placement = _write(tmp, "placement.json", placement_dict("digits-mlp", MLP, 1))
        return ["train", "--placement", str(placement), "--out", str(run), "--max-steps", "4",
                "--no-progress", "--resume"]
    return make


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _good_run_factory():
    cache: dict[str, Path] = {}

    def get() -> Path:
        if "run" not in cache:
            import tempfile
            folder = Path(tempfile.mkdtemp(prefix="dpkfac-good-run-"))
            placement = _write(folder, "placement.json", placement_dict("digits-mlp", MLP, 1))
            run_training(TrainConfig(placement=str(placement), out_dir=str(folder / "run"),
                                     max_steps=2, checkpoint_every=1, progress=False))
            cache["run"] = folder / "run"
        return cache["run"]
    return get


_good_run = _good_run_factory()


def _layers_dup(doc: dict) -> None:
    doc["layers"].append(copy.deepcopy(doc["layers"][0]))


CASES = [
    # -- profile files (dpkfac plan) ---------------------------------------------------------
    Case("profile-missing", lambda t: ["plan", "--profile", str(t / "nope.json"), "--workers", "2",
                                       "--out", str(t / "out.json")], "does not exist"),
    Case("profile-not-json", _plan("{not json"), "not valid JSON"),
    Case("profile-wrong-version", _plan(_set("schema", "dpkfac.profile/9")), "field schema"),
    Case("profile-missing-field", _plan(_set("layers", _DELETE)), "'layers' is a required"),
    Case("profile-mistyped-batch", _plan(_set("batch_size", "32")), "field batch_size"),
    Case("profile-nan-literal", _plan(PROFILE.read_text().replace(
        '"factor_a_s": ', '"factor_a_s": NaN, "x": ', 1)), "NaN is not allowed"),
    Case("profile-negative-time", _plan(_set("layers/0/decompose_a_s", -1.0)),
         "field layers/0/decompose_a_s"),
    Case("profile-overflow-inf", _plan(PROFILE.read_text().replace(
        '"optimizer_s": ', '"optimizer_s": 1e999, "y": ', 1)), "out of range"),
    Case("profile-duplicate-layer", _plan(_layers_dup), "duplicate layer name"),
    Case("profile-duplicate-key", _plan('{"schema": "dpkfac.profile/1", "schema": "x"}'),
         "duplicate key 'schema'"),
    Case("profile-top-level-array", _plan("[1, 2, 3]"), "(top level)"),
    Case("profile-deep-nesting", _plan("[" * 100000), "not valid JSON"),
    Case("profile-empty-layers", _plan(_set("layers", [])), "field layers"),
    Case("profile-bool-dim", _plan(_set("layers/0/dim_a", True)), "field layers/0/dim_a"),
    Case("profile-bad-backend", _plan(_set("comm/backend", "carrier-pigeon")), "comm/backend"),
    Case("plan-zero-workers", lambda t: ["plan", "--profile", str(PROFILE), "--workers", "0",
                                         "--out", str(t / "out.json")], "--workers"),
    Case("whatif-bad-workers", lambda t: ["whatif", "--profile", str(PROFILE), "--workers", "0,2"],
         "--workers"),
    # -- placement files (dpkfac train) ------------------------------------------------------
    Case("placement-missing", lambda t: ["train", "--placement", str(t / "nope.json"),
                                         "--out", str(t / "run")], "does not exist"),
    Case("placement-wrong-version", _train(_set("schema", "dpkfac.placement/0")), "field schema"),
    Case("placement-rank-out-of-range", _train(_set("assignment/3", 4)),
         "assignment/3: rank 4 is out of range for world_size 1"),
    Case("placement-negative-rank", _train(_set("assignment/3", -1)), "field assignment/3"),
    Case("placement-float-rank", _train(_set("assignment/3", 0.5)), "field assignment/3"),
    Case("placement-duplicate-layer-key",
         _train('{"schema": "dpkfac.placement/1", "assignment": {"1": 0, "1": 0}}'),
         "duplicate key '1'"),
    Case("placement-other-world-size", _train(None, world=2, assignment={"1": 0, "3": 1, "5": 0}),
         "field world_size"),
    Case("placement-other-model", _train(None, "--model", "digits-cnn"), "not in the placement"),
    Case("placement-unknown-layer", _train(_set("assignment/fc9", 0)),
         "placement layer(s) not in the model: 'fc9'"),
    Case("placement-missing-layer", _train(_set("assignment/5", _DELETE)),
         "model layer(s) not in the placement: '5'"),
    Case("placement-zero-freq", _train(_set("config/factor_update_freq", 0)),
         "config/factor_update_freq"),
    Case("placement-duplicate-worker", _train(_set("predicted/per_worker",
                                                   [{"rank": 0, "compute_s": 0, "memory_bytes": 0}] * 2)),
         "appears twice"),
    Case("placement-nan-prediction", _train(_set("predicted/step_time_s", float("nan"))),
         "NaN is not allowed"),
    Case("model-unknown-name", _train(_model("resnet-9000")), "unknown model 'resnet-9000'"),
    Case("model-bad-import-path", _train(_model("no_such_pkg.models:build")), "cannot load model"),
    Case("model-callable-raises", _train(_model("json:loads")), "failed: TypeError"),
    Case("model-not-a-module", _train(_model("os:getcwd")), "not an nn.Module"),
    # -- flags -------------------------------------------------------------------------------
    Case("train-out-is-a-file", lambda t: [*_train()(t), "--out", str(_write(t, "f", "x"))],
         "not a folder"),
    Case("train-zero-timeout", _train(None, "--timeout", "0"), "--timeout"),
    Case("train-bad-resume-mode", _train(None, "--resume", "sometimes"), "--resume"),
    Case("train-bad-lr-schedule", _train(None, "--lr-schedule", "step"), "--lr-schedule"),
    Case("train-negative-warmup", _train(None, "--lr-warmup-steps", "-1"), "--lr-warmup-steps"),
    # -- checkpoints (dpkfac train --resume) --------------------------------------------------
    Case("checkpoint-missing", _train(None, "--resume"), "does not exist"),
    Case("checkpoint-garbage", _resume(b"\x00garbage" * 100), "cannot be read"),
    Case("checkpoint-truncated", _resume(b"PK\x03\x04" + b"\x00" * 40), "cannot be read"),
    Case("checkpoint-arbitrary-pickle", _resume(lambda p: _Evil()), "cannot be read"),
    Case("checkpoint-wrong-format", _resume(lambda p: dict(p, format="dpkfac.checkpoint/1")),
         "field format"),
    Case("checkpoint-missing-field", _resume(lambda p: {k: v for k, v in p.items() if k != "model"}),
         "'model' is a required property"),
    Case("checkpoint-mistyped-step", _resume(lambda p: dict(p, step="7")), "field step"),
    Case("checkpoint-negative-step", _resume(lambda p: dict(p, step=-3)), "field step"),
    Case("checkpoint-other-world-size", _resume(lambda p: dict(p, world_size=2)), "world_size"),
    Case("checkpoint-other-seed", _resume(lambda p: dict(p, fingerprint=dict(p["fingerprint"], seed=9))),
         "fingerprint/seed"),
    Case("checkpoint-model-tensor-shape",
         _resume(lambda p: dict(p, model={k: v[:1] for k, v in p["model"].items()})),
         "field model: does not fit"),
    Case("checkpoint-rng-not-tensor",
         _resume(lambda p: dict(p, ranks=[dict(p["ranks"][0], rng=dict(p["ranks"][0]["rng"], torch=[1]))])),
         "rng/torch"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of `dpkfac argv` run in this process."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    return status, capsys.readouterr().err


def test_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_clean_error(case: Case, tmp_path: Path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    argv = case.make(tmp_path)
    before = _snapshot(tmp_path)
    status, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err and "this must never run" not in err
    assert case.expect in lines[-1], lines[-1]
    assert _snapshot(tmp_path) == before, "a failed command must not write anything"
