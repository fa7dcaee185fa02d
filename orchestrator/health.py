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
from orchestrator.queries import lag_events
from orchestrator.server import connect
from orchestrator.settings import Settings
from orchestrator.wording import counted
from orchestrator.workers import listening_workers
from tasks.errors import RedisUnavailable
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
) -> Health:
    """Run the checks of ``role`` against the namespace of ``settings``.

    Raises:
        RedisUrlError: the URL cannot be used at all (a usage error, not a health verdict).
    """
    keys = Keys(settings.namespace)
    try:
        # (with the embedded server: only one that a command runs; health never starts one)
        with connect(settings, join_only=True) as conn:
            return _check(conn.client, keys, role, max_lag, max_stall)
    except (RedisUnavailable, redis.RedisError) as e:
        return Health(False, f"Redis unreachable: {e}")


def _check(r: Redis, keys: Keys, role: str, max_lag: int | None, max_stall: float) -> Health:
    info = read_info(r, keys)
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
        problem = _driver_problem(driver, info, here, max_stall)
        if problem:
            return Health(False, problem)
        found.append("driver recording")
    if max_lag is not None and role != "worker":
        lag = lag_events(r, keys) if driver else 0
        if lag > max_lag:
            return Health(False, f"lag {counted(lag, 'event')} is over --max-lag {max_lag}")
        found.append(f"lag {counted(lag, 'event')}")
    return Health(True, f"namespace {keys.namespace!r}: Redis answers, {', '.join(found)}")


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
