"""The driver lock: one driver per namespace; a heartbeat lets a dead driver's lock expire."""

from __future__ import annotations

import os
import socket
import threading
import uuid

import redis
from redis import Redis
from redis.lock import Lock

from tasks.errors import PipelineError
from tasks.keys import Keys

LOCK_TTL = 30.0  # seconds a killed driver keeps the namespace locked
HEARTBEAT = 10.0


class DriverLocked(PipelineError):
    """Raised when another driver is running on the namespace."""


class DriverLock:
    """Held for the whole run; renewed by a background thread every few seconds."""

    def __init__(self, r: Redis, keys: Keys) -> None:
        self.keys = keys
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = Lock(r, keys.driver_lock, timeout=LOCK_TTL, blocking=False)
        self._r = r
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="driver-lock", daemon=True)

    def __enter__(self) -> DriverLock:
        if not self._lock.acquire(token=self.token):
            holder = self._r.get(self.keys.driver_lock)
            who = holder.decode() if holder else "unknown"
            msg = (
                f"another driver is running on namespace {self.keys.namespace!r} ({who}); "
                f"wait for it to finish, or up to {LOCK_TTL:.0f}s if it was killed"
            )
            raise DriverLocked(msg)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self._lock.reacquire()
            except redis.RedisError:
                pass  # the run itself will notice a lost Redis; a lost lock expires on its own

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._lock.release()
        except redis.RedisError:
            pass


def driver_running(r: Redis, keys: Keys) -> str | None:
    """The token of the driver holding the namespace, if any."""
    holder = r.get(keys.driver_lock)
    return holder.decode() if holder else None
