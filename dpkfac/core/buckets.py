"""Gradient all-reduce buckets: which parameters' gradients travel together, in which order.

Backward produces the last layers' gradients first, so parameters are taken in reverse model
order and packed into buckets; a bucket is closed once it holds at least its cap (the first
FIRST_BUCKET_BYTES, so that the first all-reduce starts early in backward, the others
BUCKET_BYTES). The executor posts bucket i's all-reduce once all its gradients are ready and
buckets 0..i-1 are posted (every rank posts them in the same order); the loss rides at the end
of bucket 0. The profile records, per bucket, its bytes and when it was ready; the planner's
step model posts the buckets' all-reduces from those times. Sizes in bytes.
"""
from __future__ import annotations

from typing import Sequence

FIRST_BUCKET_BYTES = 64 * 1024
BUCKET_BYTES = 4 * 1024 * 1024


def gradient_buckets(param_bytes: Sequence[int], *, first_bytes: int = FIRST_BUCKET_BYTES,
                     bytes_per_bucket: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices into `param_bytes` (one entry per parameter, model order) grouped into buckets in
    posting order: reverse model order, each bucket closed once it reaches its cap; every
    index appears exactly once. No parameters, no buckets."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in reversed(range(len(param_bytes))):
        current.append(index)
        filled += param_bytes[index]
        if filled >= (first_bytes if not buckets else bytes_per_bucket):
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets
