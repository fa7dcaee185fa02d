"""Keeping the memory of long runs flat and its big buffers cheap: glibc's allocator, tuned.

A run passes large buffers through its heap: a batch of lines, a notice with
thousands of output lines, a commit's arguments (up to megabytes each, several
per batch). Served by mmap, each one is fresh memory: every page of it faults
on first touch (measured on 1M cart events: ~490,000 minor faults in the driver
and the two workers, 1.4 s of system CPU). glibc's default raises its mmap
threshold after the first free, but only up to the size of that block, and its
trim threshold with it. Fixed thresholds well above any buffer keep them all in
the heap, where freed blocks are reused: ~125,000 faults, 0.7 s of system CPU.
A trim every few seconds hands freed heap pages back, so the heap does not hold
on to a peak. No-ops where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import time

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # larger blocks than any buffer of a run
TRIM_THRESHOLD = 128 << 20
TRIM_EVERY = 5.0  # seconds


def _glibc() -> ctypes.CDLL | None:
    try:
        # (by its soname: ctypes.util.find_library runs ldconfig, ~50 ms at every start)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - present on glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_trimmed_at = 0.0


def tune_allocator() -> None:
    """Serve blocks below 64 MiB from the heap, and shrink it only at the trims."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def trim_now_and_then() -> None:
    """Give freed heap memory back to the system, at most every TRIM_EVERY seconds."""
    global _trimmed_at
    now = time.monotonic()
    if _LIBC is not None and now - _trimmed_at >= TRIM_EVERY:
        _trimmed_at = now
        _LIBC.malloc_trim(0)
