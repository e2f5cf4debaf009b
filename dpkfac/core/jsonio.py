"""Reading JSON files with clear errors, writing any file atomically."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from .errors import InputError


def read_json(path: str | os.PathLike, *, what: str) -> Any:
    """Parse a JSON file; any failure becomes an InputError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} file {str(p)!r}: {exc}") from None
    return parse_json(text, source=f"{what} file {str(p)!r}")


def parse_json(text: str, *, source: str) -> Any:
    """Parse JSON text strictly: no NaN/Infinity, no number that overflows to infinity, no
    duplicate key in any object, no nesting deeper than the parser's recursion limit."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{source} is not valid JSON: {_one_line(str(exc))}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range (numbers must be finite)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    document: dict = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {key!r} in one object (each key at most once)")
        document[key] = value
    return document


def _is_finite_number(checker: Any, instance: Any) -> bool:
    """JSON schema "number": an int or a finite float, never a bool."""
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return False
    return math.isfinite(instance)


def _is_integer(checker: Any, instance: Any) -> bool:
    """JSON schema "integer": an int, never a bool nor a float such as 2.0 (counts and ranks
    are used as Python ints downstream)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


# Draft 2020-12 with one change: "number" and "integer" exclude NaN and the infinities, so a
# document built in Python (not parsed from text) cannot smuggle them past a "minimum".
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _is_finite_number, "integer": _is_integer}),
)

_MESSAGE_CHARS = 200


def validate(document: Any, schema: dict, *, source: str,
             explain: Callable[[Any], str] | None = None, validator: Any = None) -> None:
    """Check `document` against a JSON schema; the most relevant violation becomes an
    InputError `<source>: field <path>: <what was expected>` on one line.

    explain: turns the offending value into the message, instead of jsonschema's own wording.
    validator: a jsonschema validator class (default StrictValidator), e.g. one that knows
    more types.
    """
    cls = validator or StrictValidator
    err = jsonschema.exceptions.best_match(cls(schema).iter_errors(document))
    if err is not None:
        where = "/".join(str(part) for part in err.absolute_path) or "(top level)"
        message = explain(err.instance) if explain is not None else err.message
        raise InputError(_one_line(f"{source}: field {where}: {message}"))


def _one_line(text: str) -> str:
    """`text` on one line, cut to a readable length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _MESSAGE_CHARS else flat[:_MESSAGE_CHARS - 3] + "..."


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, document: Any) -> None:
    """Write a JSON document atomically, refusing NaN or infinite numbers."""
    _check_finite(document)
    write_atomic(path, lambda fh: (json.dump(document, fh, indent=2), fh.write("\n")))


def _check_finite(obj: Any) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write non-finite number {obj}")
    if isinstance(obj, dict):
        for value in obj.values():
            _check_finite(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_finite(value)


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
