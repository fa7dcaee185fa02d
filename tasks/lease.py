"""A worker's lease on the partition it is working on: proof of life for the driver.

RQ's SimpleWorker sends no heartbeat while a job runs, and a worker killed
mid-job is noticed by RQ only minutes later (when another worker's maintenance
runs, every 600 s by default, after the job's heartbeat expired). So a job keeps a
short-lived key alive from a background thread; when it expires without a
commit, the driver knows the job's worker is gone and runs the batch again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import redis
from redis import Redis

from tasks.scripts import renew_lease

LEASE_TTL_MS = 3_000
RENEW_EVERY = 1.0


class Lease:
    """A held lease; ``renew_if_late`` lets the job's own thread renew it too."""

    def __init__(self, r: Redis, key: str, job_id: str) -> None:
        self.r, self.key, self.job_id = r, key, job_id
        self.renewed_at = time.monotonic()
        self.fetched: bytes | None = None
        self.lost = False  # another job took the lease: this one is stale (its commit fails)

    def renew(self) -> None:
        if self.lost:
            return
        with contextlib.suppress(redis.RedisError):
            # (only while this job holds it: a worker paused and woken must not take the
            # lease back from the partition's newer job, whose proof of life it is)
            self.lost = not renew_lease(self.r, self.key, self.job_id, LEASE_TTL_MS)
            self.renewed_at = time.monotonic()

    def renew_if_late(self) -> None:
        """Renew from the calling thread when the lease thread has not for a while.

        A flow that holds the GIL in C code (a catastrophic regular expression)
        starves the lease thread; the batch timer's ticks still run
        (``tasks/watchdog.py``) and call this, so the driver does not take the
        hung worker for a dead one and send the batch to a second worker.
        """
        if time.monotonic() - self.renewed_at > 1.5 * RENEW_EVERY:
            self.renew()


@contextlib.contextmanager
def partition_lease(r: Redis, key: str, job_id: str, *, fetch: str = "") -> Iterator[Lease]:
    """Hold ``key`` = ``job_id`` (renewed every second, expiring 3 s after a crash) while inside.

    With ``fetch``, that key's value is read in the same round trip, after the lease is
    taken (``Lease.fetched``): a job's first two calls are one.
    """
    pipe = r.pipeline(transaction=False)
    pipe.set(key, job_id, px=LEASE_TTL_MS)
    if fetch:
        pipe.get(fetch)
    replies = pipe.execute()
    lease = Lease(r, key, job_id)
    lease.fetched = replies[1] if fetch else None
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_EVERY):
            lease.renew()

    thread = threading.Thread(target=renew, name=f"lease {key}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(redis.RedisError):
            # A commit released the lease already; after a job that did not commit, it
            # is released here, unless the partition's next job holds it by now.
            if r.get(key) == job_id.encode():
                r.delete(key)
