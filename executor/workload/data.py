"""Training data from a SPEC: `digits`, `synthetic`, a `.npz` file (x_train, y_train, x_test,
y_test) or a `package.module:callable` returning (train_dataset, test_dataset) of (input, target)
pairs. What was used is recorded as a data entry (a dict) in the profile and the placement."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from dpkfac.core.errors import InputError

from .callables import call_checked, is_callable_spec, load_callable
from .models import ZOO

TEST_FRACTION = 0.2
SPLIT_SEED = 0
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1024, 256  # samples of a synthetic split
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
IN_PROCESS = "in-process"  # the data entry of a profile made by dpkfac.profile(model, batch)


@dataclass(frozen=True)
class DataSplit:
    """Train and test sets of (input, target) pairs, the data entry that names them, and what
    they are in words."""
    train: Dataset
    test: Dataset
    entry: dict
    name: str


def data_entry(spec: str | None, model_name: str, *, input_shape=None, num_classes=None,
               vocab_size=None) -> dict:
    """The data entry for `--data SPEC` (or `--input-shape`, which means synthetic data of that
    shape) and model `model_name`; the model's own data when neither is given: the zoo's digits
    or synthetic data, digits for a user's model. input_dtype is filled in once data is loaded."""
    if input_shape is not None and spec not in (None, "synthetic"):
        raise InputError(f"--input-shape describes synthetic data; it cannot go with --data {spec}")
    if input_shape is None and (num_classes is not None or vocab_size is not None) \
            and spec != "synthetic":
        raise InputError("--num-classes and --vocab-size go with --input-shape")
    zoo = ZOO[model_name].inputs if model_name in ZOO else None
    if spec is None:
        spec = "synthetic" if input_shape is not None else (zoo.dataset if zoo else "digits")
    if spec == "synthetic":
        if input_shape is None and zoo is None:
            raise InputError(f"synthetic data for model {model_name!r} needs --input-shape "
                             "(e.g. 3,32,32, or a sequence length with --vocab-size)")
        if input_shape is None:
            input_shape, num_classes = list(zoo.shape), num_classes or zoo.num_classes
            vocab_size = vocab_size or zoo.vocab_size or None
        return {"spec": "synthetic", "input_shape": [int(n) for n in input_shape],
                "input_dtype": "int64" if vocab_size else "float32",
                "num_classes": num_classes, "vocab_size": vocab_size}
    if spec not in ("digits", IN_PROCESS) and not spec.endswith(".npz") \
            and not is_callable_spec(spec):
        raise InputError(f"--data {spec!r}: expected digits, synthetic, a .npz file or "
                         "package.module:callable")
    return {"spec": spec}


def load_data(entry: dict, model: torch.nn.Module) -> DataSplit:
    """The split `entry` names, with the entry completed by the inputs' shape and dtype.
    `model` shapes synthetic targets (class labels over its output's last dimension)."""
    spec = entry["spec"]
    if spec == IN_PROCESS:
        raise InputError("the placement's data was given in-process (dpkfac.profile): "
                         "pass --data SPEC")
    if spec == "digits":
        train, test, name = *_digits(), "digits"
    elif spec == "synthetic":
        train, test = _synthetic(entry, model)
        name = "synthetic (random inputs and labels: accuracy means nothing)"
    elif spec.endswith(".npz"):
        train, test, name = *_npz(spec), spec
    else:
        train, test, name = *_from_callable(spec), spec
    x, _ = train[0]
    entry = {**entry, "input_shape": list(x.shape), "input_dtype": str(x.dtype).split(".")[-1]}
    return DataSplit(train=train, test=test, entry=entry, name=name)


def _digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits split 80/20 by a fixed permutation (same on every rank)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(len(labels)))
    n_test = int(round(TEST_FRACTION * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return (TensorDataset(images[train_idx], labels[train_idx]),
            TensorDataset(images[test_idx], labels[test_idx]))


def _synthetic(entry: dict, model: torch.nn.Module) -> tuple[TensorDataset, TensorDataset]:
    """Seeded random inputs of the entry's shape (token ids below vocab_size for int64 inputs)
    and class-label targets shaped like the model's output without its last dimension."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    shape, vocab = tuple(entry["input_shape"]), entry.get("vocab_size")

    def inputs(n: int) -> torch.Tensor:
        if vocab:
            return torch.randint(0, vocab, (n, *shape), generator=generator)
        return torch.randn(n, *shape, generator=generator)

    from .checks import output_of

    out = output_of(model, inputs(2), what="synthetic data")
    classes = entry.get("num_classes") or out.shape[-1]
    if classes > out.shape[-1]:
        raise InputError(f"--num-classes {classes}: the model's output has only "
                         f"{out.shape[-1]} classes (last dimension of {tuple(out.shape)})")

    def split(n: int) -> TensorDataset:
        x = inputs(n)
        return TensorDataset(x, torch.randint(0, classes, (n, *out.shape[1:-1]),
                                              generator=generator))

    return split(SYNTHETIC_TRAIN), split(SYNTHETIC_TEST)


def _npz(path: str) -> tuple[TensorDataset, TensorDataset]:
    """A .npz file's four arrays: floating inputs as float32, integer ones (token ids) and
    integer targets as int64, floating targets as float32."""
    if not Path(path).is_file():
        raise InputError(f"--data {path!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_ARRAYS if k not in npz.files]
            if missing:
                raise InputError(f"--data {path!r} lacks array(s) {', '.join(missing)} "
                                 f"(has {', '.join(npz.files) or 'none'}; needs "
                                 f"{', '.join(NPZ_ARRAYS)})")
            arrays = {k: npz[k] for k in NPZ_ARRAYS}
    except InputError:
        raise
    except Exception as exc:  # not a zip, a pickled object array, a truncated file
        raise InputError(f"--data {path!r} is not a readable .npz file: {exc}") from None
    return tuple(_tensor_pair(path, arrays, part) for part in ("train", "test"))


def _tensor_pair(path: str, arrays: dict, part: str) -> TensorDataset:
    x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
    if len(x) == 0 or len(x) != len(y):
        raise InputError(f"--data {path!r}: x_{part} has {len(x)} samples and y_{part} "
                         f"{len(y)}: they must be equal and non-zero")
    return TensorDataset(_as_tensor(path, f"x_{part}", x), _as_tensor(path, f"y_{part}", y))


def _as_tensor(path: str, key: str, array: np.ndarray) -> torch.Tensor:
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return torch.from_numpy(array.astype(np.int64))
    raise InputError(f"--data {path!r}: array {key} has dtype {array.dtype}, "
                     "expected numbers")


def _from_callable(spec: str) -> tuple[Dataset, Dataset]:
    """A user's callable's (train, test) datasets, checked to be non-empty (input, target)
    sequences."""
    made = call_checked(load_callable(spec, what="data"), what="data", spec=spec)
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise InputError(f"data {spec!r} returned {type(made).__name__}, expected "
                         "(train_dataset, test_dataset)")
    for part, dataset in zip(("train", "test"), made):
        try:
            size, sample = len(dataset), dataset[0]
        except Exception as exc:
            raise InputError(f"data {spec!r}: the {part} dataset cannot be read: "
                             f"{type(exc).__name__}: {exc}") from None
        if size == 0 or not (isinstance(sample, (tuple, list)) and len(sample) == 2):
            raise InputError(f"data {spec!r}: the {part} dataset must be non-empty with "
                             "(input, target) pairs")
        if not all(isinstance(t, torch.Tensor) for t in sample):
            raise InputError(f"data {spec!r}: the {part} dataset's samples must be pairs "
                             "of tensors")
    return made[0], made[1]
