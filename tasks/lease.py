"""A worker's lease on the partition it is working on: proof of life for the driver.

RQ's SimpleWorker sends no heartbeat while a job runs, and a worker killed
mid-job is noticed by RQ only minutes later (RQ-FACTS.md). So a job keeps a
short-lived key alive from a background thread; when it expires without a
commit, the driver knows the job's worker is gone and runs the batch again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import redis
from redis import Redis

LEASE_TTL_MS = 3_000
RENEW_EVERY = 1.0


@contextlib.contextmanager
def partition_lease(r: Redis, key: str, job_id: str) -> Iterator[None]:
    """Hold ``key`` = ``job_id`` (renewed every second, expiring 3 s after a crash) while inside."""
    r.set(key, job_id, px=LEASE_TTL_MS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_EVERY):
            with contextlib.suppress(redis.RedisError):
                r.set(key, job_id, px=LEASE_TTL_MS)

    thread = threading.Thread(target=renew, name=f"lease {key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(redis.RedisError):
            # A commit released the lease already; after a job that did not commit, it
            # is released here, unless the partition's next job holds it by now.
            if r.get(key) == job_id.encode():
                r.delete(key)
