"""A user's `package.module:callable`, imported and called with every failure turned into one
InputError naming what it was for."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from dpkfac.core.errors import InputError


def is_callable_spec(spec: str) -> bool:
    """True for a `package.module:callable` reference (a colon, not a Windows drive letter)."""
    module, sep, attr = spec.partition(":")
    return bool(sep) and bool(attr) and len(module) > 1 and "/" not in module


def load_callable(spec: str, *, what: str) -> Callable:
    """The object `spec` (`package.module:callable`) names; InputError if it cannot be imported
    or is not callable. `what` says what it is for ("model", "data", "loss")."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # a user's module can raise anything while importing
        raise InputError(f"cannot load {what} {spec!r}: {_brief(exc)}") from None
    if not callable(obj):
        raise InputError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_checked(fn: Callable, *args: Any, what: str, spec: str) -> Any:
    """fn(*args), with any exception turned into an InputError naming `what` and `spec`."""
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{what} {spec!r} failed: {_brief(exc)}") from None


def _brief(exc: BaseException) -> str:
    """`Type: message` on one line, at most 200 characters of message."""
    detail = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
