"""Property-based fuzz of every loader: whatever the input, the only exception is InputError."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from executor.training.checkpoints import CHECKPOINT_FORMAT, read_checkpoint
from executor_fixtures import placement_dict
from dpkfac.core.errors import InputError
from dpkfac.core.placement import load_placement
from dpkfac.core.profile import load_profile, profile_from_dict

PROFILE = json.loads((Path(__file__).resolve().parents[1] / "profiles"
                      / "digits-mlp.b32.cpu2-gloo.json").read_text())
PLACEMENT = placement_dict("digits-mlp", {"1": 0, "3": 1, "5": 0}, 2)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def _paths(doc, prefix=()):
    """Every path (tuple of keys/indices) into a nested document."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, prefix + (index,))


def _mutated(doc: dict, data, values=json_values) -> dict:
    """`doc` with one randomly chosen node replaced, deleted or duplicated."""
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(list(_paths(doc))[1:]))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
    if action == "replace":
        parent[path[-1]] = data.draw(values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[path[-1]]))
    return doc


def _only_input_error(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except InputError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(doc=json_values)
def test_profile_from_arbitrary_values(doc):
    _only_input_error(profile_from_dict, doc)


@FUZZ
@given(data=st.data())
def test_profile_from_mutated_valid_profile(data):
    _only_input_error(profile_from_dict, _mutated(PROFILE, data))


@FUZZ
@given(data=st.data())
def test_placement_from_mutated_valid_placement(data):
    _only_input_error(load_placement, _mutated(PLACEMENT, data))


@FUZZ
@given(doc=json_values)
def test_placement_from_arbitrary_values(doc):
    _only_input_error(load_placement, doc if isinstance(doc, dict) else {"x": doc})


@FUZZ
@given(text=st.one_of(st.text(max_size=200),
                      st.builds(json.dumps, json_values),
                      st.sampled_from(["[" * 5000, '{"a": 1, "a": 2}', "1e400", "-Infinity",
                                       "\ud800", '{"schema": "dpkfac.profile/1"}'])))
def test_loaders_from_arbitrary_file_text(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "doc.json"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    _only_input_error(load_profile, path)
    _only_input_error(load_placement, path)


def _valid_checkpoint() -> dict:
    """A structurally valid checkpoint payload for a world of 1 (tiny tensors)."""
    return {"format": CHECKPOINT_FORMAT, "world_size": 1, "step": 3, "epoch": 0,
            "batch_in_epoch": 3, "threads": 1, "skipped_steps": 0,
            "model": {"0.weight": torch.zeros(2, 2)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "fingerprint": {"seed": 0},
            "ranks": [{"preconditioner": {"steps": 3, "blocks": {"0": {"factor_a": torch.eye(2)}}},
                       "rng": {"python": [3, [1, 2], None], "numpy": ["MT19937", torch.zeros(3),
                                                                      0, 0, 0.0],
                               "torch": torch.get_rng_state()}}]}


@FUZZ
@given(blob=st.binary(max_size=300))
def test_checkpoint_from_arbitrary_bytes(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    path.write_bytes(blob)
    _only_input_error(read_checkpoint, path, world_size=1)


@FUZZ
@given(data=st.data())
def test_checkpoint_from_mutated_payload(data, tmp_path_factory):
    values = st.one_of(json_values, st.just(torch.ones(2)), st.just(torch.tensor(float("nan"))))
    payload = _mutated(_valid_checkpoint(), data, values)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    path.write_bytes(buffer.getvalue())
    _only_input_error(read_checkpoint, path, world_size=data.draw(st.integers(1, 3)))
