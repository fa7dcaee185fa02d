"""``orchestrator health``: exit 0 healthy or 1 unhealthy, with one line saying why.

For scripts and container health checks. Each role checks what its container runs:

- ``any`` (the default): Redis answers, at least one live worker listens on the
  namespace's queues, and (with ``--max-lag``) a running driver's backlog is under it.
- ``worker``: Redis answers and a worker of this host is registered on the namespace's
  queues and heartbeating (before the first ingest a worker waits unregistered: healthy).
- ``driver``: Redis answers, a driver of this host holds the namespace and recorded its
  progress in the last ``--max-stall`` seconds, and its backlog is under ``--max-lag``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import redis
from redis import Redis

from orchestrator.lock import driver_running
from orchestrator.namespace import NamespaceInfo, read_info
from orchestrator.queries import lag_events, source_lag
from orchestrator.server import connect, source_connection
from orchestrator.settings import STREAM_SOURCE, Settings
from orchestrator.wording import counted
from orchestrator.workers import listening_workers
from tasks.errors import NamespaceError, RedisUnavailable
from tasks.keys import Keys

ROLES = ("any", "worker", "driver")
# A running driver records at least once a second (driver.FENCE_EVERY): 30 s without a
# record is a driver stuck (or paused), as long as its lock outlives a killed one.
DEFAULT_MAX_STALL = 30.0


@dataclass(frozen=True)
class Health:
    """The verdict: healthy or not, and one line saying why."""

    healthy: bool
    reason: str


def check(
    settings: Settings,
    role: str = "any",
    max_lag: int | None = None,
    max_stall: float = DEFAULT_MAX_STALL,
    max_lag_seconds: float | None = None,
) -> Health:
    """Run the checks of ``role`` against the namespace of ``settings``.

    Raises:
        RedisUrlError: the URL cannot be used at all (a usage error, not a health verdict).
        NamespaceError: --max-lag-seconds on a namespace whose input is not a stream.
    """
    keys = Keys(settings.namespace)
    limits = Limits(max_lag, max_stall, max_lag_seconds, settings.source_url)
    try:
        # (with the embedded server: only one that a command runs; health never starts one)
        with connect(settings, join_only=True) as conn:
            return _check(conn.client, keys, role, limits)
    except (RedisUnavailable, redis.RedisError) as e:
        return Health(False, f"Redis unreachable: {e}")


@dataclass(frozen=True)
class Limits:
    """The thresholds given, and where a stream input lives."""

    max_lag: int | None
    max_stall: float
    max_lag_seconds: float | None
    source_url: str | None


def _reads_stream(info: NamespaceInfo) -> bool:
    return info.input is not None and info.input.startswith(STREAM_SOURCE)


def _check(r: Redis, keys: Keys, role: str, limits: Limits) -> Health:
    info = read_info(r, keys)
    if limits.max_lag_seconds is not None and not _reads_stream(info):
        msg = (
            f"--max-lag-seconds needs a redis-stream:KEY input (its entries carry their time); "
            f"namespace {keys.namespace!r} reads {info.input or 'nothing yet'}: use --max-lag"
        )
        raise NamespaceError(msg)
    partitions = info.partitions or 1  # before the first ingest: workers wait unregistered
    here = socket.gethostname()
    found: list[str] = []
    if role == "worker":
        mine = listening_workers(r, keys, partitions, host=here)
        if mine == 0 and info.exists:
            return Health(False, f"no live worker of host {here} on namespace {keys.namespace!r}")
        found.append(f"{counted(mine, 'worker')} of this host")
    elif role == "any":  # (a driver with --workers 0 is healthy without them: it waits)
        workers = listening_workers(r, keys, partitions)
        if workers == 0:
            return Health(False, f"no live worker listens on namespace {keys.namespace!r}")
        found.append(f"{counted(workers, 'worker')} listening")
    driver = driver_running(r, keys)
    if role == "driver":
        problem = _driver_problem(driver, info, here, limits.max_stall)
        if problem:
            return Health(False, problem)
        found.append("driver recording")
    if role != "worker" and (limits.max_lag is not None or limits.max_lag_seconds is not None):
        problem = _lag_problem(r, keys, info, driver, limits, found)
        if problem:
            return Health(False, problem)
    return Health(True, f"namespace {keys.namespace!r}: Redis answers, {', '.join(found)}")


def _lag_problem(
    r: Redis, keys: Keys, info: NamespaceInfo, driver: str | None, limits: Limits, found: list[str]
) -> str:
    """Lag over a threshold: events (read and not committed, or for a stream input: entries
    after the committed one) and seconds (a stream's newest entry after the committed one)."""
    seconds: float | None = None
    if _reads_stream(info):
        with source_connection(limits.source_url, r) as source_r:
            behind = source_lag(source_r, info)
        events, seconds = behind["source_lag_entries"], behind["source_lag_seconds"]
        if events is None:
            return "lag unknown: the input stream is not on this Redis (--source-url?)"
    else:
        events = lag_events(r, keys) if driver else 0
    if limits.max_lag is not None and events > limits.max_lag:
        return f"lag {counted(events, 'event')} is over --max-lag {limits.max_lag}"
    found.append(f"lag {counted(events, 'event')}")
    if limits.max_lag_seconds is not None and seconds is not None:
        if seconds > limits.max_lag_seconds:
            return f"lag {seconds:g} s is over --max-lag-seconds {limits.max_lag_seconds:g}"
        found.append(f"{seconds:g} s behind the stream")
    return ""


def _driver_problem(driver: str | None, info: NamespaceInfo, here: str, max_stall: float) -> str:
    if driver is None:
        return "no driver runs on the namespace"
    host = driver.rsplit(":", 2)[0]
    if host != here:
        return f"the namespace's driver runs on host {host}, not on this one ({here})"
    age = None if info.at is None else time.time() - info.at
    if age is None or age > max_stall:
        return f"the driver recorded no progress for over {max_stall:g} s"
    return ""
