"""Process-wide CPU settings that change speed, not results that matter.

Subnormal floats. K-FAC drives some weights and activations into subnormal (denormal) floats: preconditioned
updates of inputs that are always zero (the blank border pixels of digits) decay towards 0 in
the eigenbasis. x86 CPUs handle subnormals in microcode, tens of times slower than normal
floats; on this machine a digits-cnn DP-KFAC run's forward/backward grew from 1.6 ms to 3.8 ms
within 30 steps while SGD stayed at 1.5 ms. Flushing subnormals to zero (FTZ/DAZ) removes that;
values below ~1.2e-38 become 0. GPUs are unaffected (the setting only applies to CPU kernels).

Freed memory. glibc's malloc serves large blocks with mmap and gives freed memory back to the
kernel, so every step's large temporaries (a convolution's unfolded input: 19 MB for resnet20's
first stage at batch 32) are page-faulted in again. Here that cost 35% of resnet20's factor
construction (505 ms -> 324 ms per step once freed memory is kept), and made a layer's cost
depend on what ran before it. Keeping freed memory in the process (mallopt's trim and mmap
thresholds raised, as jemalloc/tcmalloc would) removes it, at the price of the process keeping
its peak heap.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from typing import Iterator

import torch


def flush_denormal_enabled() -> bool:
    """Whether this process's CPU kernels flush subnormal floats to zero now."""
    smallest_subnormal = torch.tensor([1], dtype=torch.int32).view(torch.float32)
    return bool((smallest_subnormal * 1.0).item() == 0.0)


@contextmanager
def flushed_denormals(enabled: bool) -> Iterator[bool]:
    """Flush subnormal floats to zero in CPU kernels inside the block when `enabled` (the
    default of `train` and `profile`, so both time the same arithmetic); the setting before is
    restored after. Yields whether flushing is in effect (False where the CPU cannot)."""
    before = flush_denormal_enabled()
    torch.set_flush_denormal(enabled)
    try:
        yield flush_denormal_enabled()
    finally:
        torch.set_flush_denormal(before)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLDS = (1 << 30, 256 << 20, 32 << 20)  # bytes, tried in turn (glibc caps it)


def keep_freed_memory() -> dict:
    """Make glibc's malloc keep freed memory for reuse: never trim the heap, and serve blocks
    up to the largest accepted MMAP_THRESHOLDS size from it. For the rest of the process (it
    cannot be undone). Returns the settings made ({} where the C library is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return {}
    gnu.restype = ctypes.c_char_p
    if not mallopt(M_TRIM_THRESHOLD, 2**31 - 1):
        return {}
    mmap = next((size for size in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, size)), None)
    return {"glibc": gnu().decode(), "malloc_trim_threshold": 2**31 - 1,
            "malloc_mmap_threshold": mmap}
