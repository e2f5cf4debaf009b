"""Parsing human-written quantities from the command line: byte sizes, link rates and
integer lists."""
from __future__ import annotations

import argparse
import math
import re
from decimal import Decimal
from typing import Callable

from .errors import InputError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, *, what: str = "size") -> int:
    """Bytes from '1048576', '512MiB', '2GB', '1.5 GiB' (KB/MB/GB/TB: powers of 1000;
    KiB/MiB/GiB/TiB: powers of 1024; case-insensitive). InputError if malformed."""
    match = _BYTES_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise InputError(f"{what} {text!r} is not a byte size; expected e.g. 1073741824, "
                         f"512MiB or 2GB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    value = Decimal(match.group(1)) * _BYTE_UNITS[unit]
    if value != int(value):
        raise InputError(f"{what} {text!r} is not a whole number of bytes")
    return int(value)


# Of every full frame a TCP stream puts on an Ethernet link at MTU 1500, the payload's share:
# 1448 bytes of data (TCP and IPv4 headers with timestamps take 52) in a 1514-byte frame.
TCP_PAYLOAD_FRACTION = 1448 / 1514
# A link direction that carries one TCP stream while the other direction carries another (a
# ring all-reduce's ranks send and receive at once) also carries the reverse stream's ACKs:
# a 66-byte frame (delayed ACK) per two full frames, as a share of the data's line bytes.
TCP_REVERSE_ACK_SHARE = 66 / (2 * 1514)

_RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}  # tc's suffixes, bits/s
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def parse_link_rate(text: str, *, what: str = "link rate") -> float:
    """Bytes per second from a link rate as tc writes it: '100mbit', '25gbit', '800kbit'
    (bits per second; case-insensitive). InputError if malformed or not positive."""
    match = _RATE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _RATE_UNITS or float(match.group(1)) <= 0:
        raise InputError(f"{what} {text!r} is not a link rate; expected e.g. 100mbit, 25gbit "
                         "or 800kbit (bits per second)")
    return float(match.group(1)) * _RATE_UNITS[unit] / 8


def payload_bytes_per_s(line_rate: str, *, what: str = "link rate") -> float:
    """The payload bytes per second a TCP stream gets on an Ethernet link whose line rate tc
    writes as `line_rate` ('100mbit': 12.5e6 B/s on the line, 11.96e6 of payload), the rate
    collectives over it see. InputError as parse_link_rate."""
    return parse_link_rate(line_rate, what=what) * TCP_PAYLOAD_FRACTION


def parse_int_list(text: str, *, what: str = "list", minimum: int = 1) -> tuple[int, ...]:
    """Integers from a comma-separated list like '1,2,4,8', each >= `minimum`, in the order given,
    duplicates dropped. InputError if malformed or empty."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not re.fullmatch(r"[+]?\d+", p) for p in parts):
        raise InputError(f"{what} {text!r} is not a comma-separated list of integers "
                         f"(e.g. 1,2,4,8)")
    values = tuple(dict.fromkeys(int(p) for p in parts))
    small = [v for v in values if v < minimum]
    if small:
        raise InputError(f"{what} {text!r}: every value must be >= {minimum}, got {small[0]}")
    return values


def parse_float_list(text: str, *, what: str = "list") -> tuple[float, ...]:
    """Positive finite numbers from a comma-separated list like '1,1,0.5'. InputError if not."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise InputError(f"{what} {text!r} is not a comma-separated list of positive "
                             f"numbers (e.g. 1,1,0.5)")
        values.append(value)
    return tuple(values)


def argtype(convert: Callable[[str], float], accept: Callable[[float], bool],
            expected: str) -> Callable[[str], float]:
    """An argparse `type=`: convert the text and accept the value, else a usage error
    "expected <expected>, got '<text>'"."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = argtype(int, lambda v: v >= 1, "an integer >= 1")
positive_float = argtype(float, lambda v: 0 < v < math.inf, "a positive number")
positive_seconds = argtype(float, lambda v: 0 < v < math.inf, "seconds > 0")
fraction = argtype(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
