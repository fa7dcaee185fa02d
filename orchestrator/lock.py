"""The driver lock: one driver per namespace; a heartbeat lets a dead driver's lock expire."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import cast

import redis
from redis import Redis
from redis.lock import Lock

from orchestrator.errors import DriverLocked
from tasks.errors import PipelineError
from tasks.keys import Keys

logger = logging.getLogger(__name__)

LOCK_TTL = 30.0  # seconds a killed driver keeps the namespace locked
HEARTBEAT = 10.0
LOCK_TTL_ENV = "ORCHESTRATOR_DRIVER_LOCK_TTL"  # seconds; a tuning knob, used by the fault tests


def lock_ttl() -> float:
    """The driver lock's TTL: ``ORCHESTRATOR_DRIVER_LOCK_TTL`` seconds if set, else LOCK_TTL."""
    value = os.environ.get(LOCK_TTL_ENV)
    try:
        return float(value) if value else LOCK_TTL
    except ValueError:
        msg = f"{LOCK_TTL_ENV}={value!r} is not a number of seconds"
        raise PipelineError(msg) from None


class DriverLock:
    """Held for the whole run; renewed by a background thread every few seconds."""

    def __init__(self, r: Redis, keys: Keys) -> None:
        self.keys = keys
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl = lock_ttl()
        self.heartbeat = min(HEARTBEAT, self.ttl / 3)
        # Not thread-local: the heartbeat thread renews the token the main thread took.
        # The lock only keeps two live drivers apart; what fences a driver that was paused
        # past its TTL is the generation, checked by every write that records progress.
        self._lock = Lock(r, keys.driver_lock, timeout=self.ttl, blocking=False, thread_local=False)
        self._r = r
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="driver-lock", daemon=True)

    def __enter__(self) -> DriverLock:
        if not self._lock.acquire(token=self.token):
            holder = driver_running(self._r, self.keys) or "unknown"
            if not (self._holder_is_dead(holder) and self._lock.acquire(token=self.token)):
                msg = (
                    f"another driver is running on namespace {self.keys.namespace!r} ({holder}); "
                    f"wait for it to finish, or up to {self.ttl:.0f}s if it was killed"
                )
                raise DriverLocked(msg)
        self._thread.start()
        return self

    def _holder_is_dead(self, holder: str) -> bool:
        """Whether the lock belongs to a driver process of this host that no longer exists.

        Then its lock is released at once instead of after its TTL (a killed
        driver is resumed right away); a holder on another host just expires.
        """
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
            return False
        except ProcessLookupError:
            pass
        except PermissionError:
            return False  # alive, owned by someone else
        with self._r.pipeline() as pipe:
            try:
                pipe.watch(self.keys.driver_lock)
                if pipe.get(self.keys.driver_lock) != holder.encode():
                    return False
                pipe.multi()
                pipe.delete(self.keys.driver_lock)
                pipe.execute()
            except redis.WatchError:
                return False
        logger.warning("the previous driver (pid %s) is gone; taking over its namespace", pid)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._lock.reacquire()
            except redis.RedisError:
                pass  # the run itself will notice a lost Redis; a lost lock expires on its own

    @property
    def ttl_ms(self) -> int:
        """The TTL in milliseconds, as the fenced scripts renew it."""
        return int(self.ttl * 1000)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._lock.release()
        except redis.RedisError:
            pass


def driver_running(r: Redis, keys: Keys) -> str | None:
    """The token of the driver holding the namespace, if any."""
    holder = cast("bytes | None", r.get(keys.driver_lock))
    return holder.decode() if holder else None
